/*
 * What opqueue-bench.c (the runs, the checks, the tables) and bench-peers.c
 * (the thread pools opqueue is measured against) share.
 */
#ifndef OPQ_TOOLS_BENCH_H
#define OPQ_TOOLS_BENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The run's producers, runners, operations per producer and spin per operation. */
extern unsigned P, R;
extern long M, W;
/* Operations in this run (P x M; the samples of a latency run). */
extern long nops;

/* What an operation does with its index: work, or record a latency sample. */
extern void (*perform_cb)(long);
/* Spin W ns, then log the index (unless a warm-up is not recording). */
void work(long i);
extern bool recording;
/* perform_cb on an index passed as the argument of a function-pointer operation. */
void fn_perform(void *arg);

/* The timed window: clock_start before the first enqueue, clock_stop once all ran. */
/* CLOCK_MONOTONIC, and the process's CPU time (every thread), in ns. */
uint64_t now_ns(void);
uint64_t cpu_ns(void);
void clock_start(void);
void clock_stop(void);
/* A producer thread, at its end: its CPU time counts as enqueueing. */
void producer_done(void);
/* Start n threads running fn((void *)i) and join them. */
void spawn_join(unsigned n, void *(*fn)(void *));
/* Latency: one operation at a time through setup, submit and teardown. */
int latency_run(int (*setup)(void), void (*submit)(long), int (*teardown)(void));

/* The peers (bench-peers.c): one burst run and one latency run each. */
#ifdef HAVE_GLIB
int burst_glib(void);
int latency_glib(void);
#endif
#ifdef HAVE_LIBUV
int burst_libuv(void);
int latency_libuv(void);
/* UV_THREADPOOL_SIZE=R: libuv reads it once, on first use. */
void uv_set_size(void);
#endif
int burst_plain(void);
int latency_plain(void);

/* One chart of a plot: clustered bars, rows are clusters, columns bars. */
struct panel {
	const char *title, *xlabel, *ylabel;
	bool logy;
	const char *const *rows;
	size_t nrows;
	const char *const *cols;
	size_t ncols;
	const double *data; /* nrows x ncols */
};
/* Draw the panels (at most 4) side by side into an SVG file with gnuplot. */
int plot(const char *file, const char *title, const struct panel *panels, size_t npanels);

/* The loop workload (bench-loop.c): round trips from an event loop's thread. */
struct loop_opts {
	unsigned runners, repeats;
	long trips;        /* round trips per throughput run (-m) */
	long samples;      /* latency samples (-n) */
	const long *spins; /* work per operation, ns (-w) */
	size_t nspins;
	const long *windows; /* operations in flight (-i) */
	size_t nwindows;
	bool intrusive, submit, libuv; /* -V intrusive,fn,libuv */
	bool no_fork;                  /* -F */
	const char *plot;              /* --plot */
};
int run_loop(const struct loop_opts *o);

#endif
