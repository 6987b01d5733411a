/*
 * opqueue.h: the umbrella header of libopqueue.
 *
 * A daemon includes <opqueue.h> and links with -lopqueue (see
 * `pkg-config --cflags --libs opqueue`). Each module has its own header
 * under <opqueue/...>; man/opqueue.7 is the overview.
 */
#ifndef OPQUEUE_H
#define OPQUEUE_H

#include <opqueue/common.h>
#include <opqueue/queue.h>
#include <opqueue/line.h>
#include <opqueue/stage.h>
#include <opqueue/scope.h>
#include <opqueue/chan.h>
#include <opqueue/lease.h>

#endif /* OPQUEUE_H */
