/* The README's example: ten caller-boxed jobs on four runners. */
#include <opqueue.h>
#include <stdio.h>
#include <stdlib.h>

struct job {
	opq_op op;
	int n;
}; /* the queue's header, embedded */

static void job_run(opq_op *op)
{
	struct job *j = OPQ_CONTAINER_OF(op, struct job, op);
	printf("job %d\n", j->n);
	free(j); /* perform owns it now */
}

int main(void)
{
	opq_queue *q;
	if (opq_queue_create(&q, NULL) || opq_queue_start(q, 4))
		return 1;
	for (int i = 0; i < 10; i++) {
		struct job *j = malloc(sizeof(*j));
		if (!j)
			break;
		j->n = i;
		opq_op_init(&j->op, job_run, NULL);
		if (opq_queue_enqueue(q, &j->op)) /* on error we keep it */
			free(j);
	}
	opq_queue_stop(q, OPQ_STOP_DRAIN); /* performs all, joins runners */
	return opq_queue_destroy(q);
}
