// Diagnostic for experiments/bench.py and profile_step.py; not part of jlora or of CI.
//
// XLA:CPU allocates a fresh temp arena for every call of a compiled step (posix_memalign, which
// glibc serves with mmap at these sizes) and frees it after, so every page of it is faulted in
// again on every step. Preloaded, this library serves aligned allocations of 16 MiB or more
// from mappings it keeps across free(), the way an accelerator's caching allocator would, so
// a step can be timed without those page faults:
//
//   gcc -O2 -shared -fPIC -o /tmp/arena_cache.so experiments/tools/arena_cache.c -ldl -lpthread
//   LD_PRELOAD=/tmp/arena_cache.so python -m experiments.bench --quick --models mlp,unet
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/mman.h>

#define MIN_SIZE (16UL << 20)
#define SLOTS 256

static void (*real_free)(void *);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static struct { void *p; size_t n; int in_use; } blocks[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void init(void) {
  if (!real_free) real_free = dlsym(RTLD_NEXT, "free");
  if (!real_posix_memalign) real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
  if (!real_aligned_alloc) real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
}

static void *take(size_t n) {
  pthread_mutex_lock(&lock);
  for (int i = 0; i < SLOTS; i++)
    if (blocks[i].p && !blocks[i].in_use && blocks[i].n == n) {
      blocks[i].in_use = 1; pthread_mutex_unlock(&lock); return blocks[i].p;
    }
  for (int i = 0; i < SLOTS; i++)
    if (!blocks[i].p) {
      void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) break;
      blocks[i].n = n; blocks[i].in_use = 1; __atomic_store_n(&blocks[i].p, p, __ATOMIC_RELEASE);
      pthread_mutex_unlock(&lock); return p;
    }
  pthread_mutex_unlock(&lock);
  return NULL;
}

static int give_back(void *p) {
  int found = 0;
  for (int i = 0; i < SLOTS; i++)
    if (__atomic_load_n(&blocks[i].p, __ATOMIC_ACQUIRE) == p) { found = 1; break; }
  if (!found) return 0;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < SLOTS; i++)
    if (blocks[i].p == p) { blocks[i].in_use = 0; pthread_mutex_unlock(&lock); return 1; }
  pthread_mutex_unlock(&lock);
  return 0;
}

int posix_memalign(void **out, size_t align, size_t n) {
  init();
  if (n >= MIN_SIZE && align <= 4096) {
    void *p = take(n);
    if (p) { *out = p; return 0; }
  }
  return real_posix_memalign(out, align, n);
}

void *aligned_alloc(size_t align, size_t n) {
  init();
  if (n >= MIN_SIZE && align <= 4096) {
    void *p = take(n);
    if (p) return p;
  }
  return real_aligned_alloc(align, n);
}

void free(void *p) {
  init();
  if (p && give_back(p)) return;
  real_free(p);
}
