/* What libsae promises the process it runs in (docs/design.md, "What a host process can count
 * on"): saves touch no process-wide state and replace only regular files, opens never block on
 * something that is not a file, a copied model survives its file, parameters are checked as the
 * floats they become, and sizes beyond the machine are refused instead of getting the host
 * OOM-killed. Each test here failed on libsae 0.1. */
#define _GNU_SOURCE /* lstat, symlink, mknod, makedev */
#include "testutil.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

enum { D_IN = 24, D_SAE = 40, N = 5 };

/* The process umask as the kernel reports it, read without changing it (umask() cannot). */
static unsigned current_umask(void)
{
    FILE *fp = fopen("/proc/self/status", "r");
    ck_assert_ptr_nonnull(fp);
    char line[256];
    unsigned mask = 0xffffu;
    while (fgets(line, sizeof line, fp) != NULL)
        if (sscanf(line, "Umask: %o", &mask) == 1)
            break;
    fclose(fp);
    ck_assert_msg(mask != 0xffffu, "no Umask line in /proc/self/status");
    return mask;
}

typedef struct {
    const sae_model *m;
    char *path;
    int rounds, failures;
} saver;

static void *save_loop(void *arg)
{
    saver *s = arg;
    for (int i = 0; i < s->rounds; i++)
        if (sae_model_save(s->m, s->path) != SAE_OK)
            s->failures++;
    return NULL;
}

/* atomic: the watcher reads it while the test thread clears it (volatile is no synchronization) */
static atomic_int watching;

static void *watch_umask(void *arg)
{
    int *changed = arg;
    while (watching)
        if (current_umask() != 022)
            (*changed)++;
    return NULL;
}

START_TEST(concurrent_saves_leave_the_umask_alone)
{
    mode_t old = umask(022);
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 4, 8, 1);
    enum { SAVERS = 3 };
    saver s[SAVERS];
    pthread_t th[SAVERS], watcher;
    int changed = 0;
    watching = 1;
    ck_assert_int_eq(pthread_create(&watcher, NULL, watch_umask, &changed), 0);
    for (int i = 0; i < SAVERS; i++) {
        char name[32];
        snprintf(name, sizeof name, "umask-%d.safetensors", i);
        s[i] = (saver){m, tu_tmp_path(name), 150, 0};
        ck_assert_int_eq(pthread_create(&th[i], NULL, save_loop, &s[i]), 0);
    }
    for (int i = 0; i < SAVERS; i++)
        pthread_join(th[i], NULL);
    watching = 0;
    pthread_join(watcher, NULL);
    for (int i = 0; i < SAVERS; i++) {
        ck_assert_int_eq(s[i].failures, 0);
        struct stat st;
        ck_assert_int_eq(stat(s[i].path, &st), 0);
        ck_assert_msg((st.st_mode & 0777) == 0644, "a save made mode %o, expected 644",
                      (unsigned)(st.st_mode & 0777));
        free(s[i].path);
    }
    ck_assert_msg(changed == 0, "the process umask was seen changed %d times during saves",
                  changed);
    /* And a file the host makes afterwards gets the host's umask. */
    char *later = tu_tmp_path("umask-later");
    int fd = open(later, O_CREAT | O_WRONLY | O_TRUNC, 0666);
    ck_assert_int_ge(fd, 0);
    struct stat st;
    ck_assert_int_eq(fstat(fd, &st), 0);
    close(fd);
    ck_assert_uint_eq(st.st_mode & 0777, 0644);
    free(later);
    sae_model_free(m);
    umask(old);
}
END_TEST

START_TEST(a_replaced_file_keeps_its_permissions)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 4, 8, 2);
    char *path = tu_tmp_path("perm.safetensors");
    ck_assert_ok(sae_model_save(m, path));
    ck_assert_int_eq(chmod(path, 0600), 0);
    ck_assert_ok(sae_model_save(m, path));
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_uint_eq(st.st_mode & 0777, 0600);
    free(path);
    sae_model_free(m);
}
END_TEST

/* path is of the kind `kind` (S_IFIFO...) before and after a refused save. */
static void assert_save_refused(const sae_model *m, const char *path, mode_t kind)
{
    struct stat before, after;
    ck_assert_int_eq(lstat(path, &before), 0);
    ck_assert_sae(sae_model_save(m, path), SAE_EINVAL);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), path));
    ck_assert_int_eq(lstat(path, &after), 0);
    ck_assert_uint_eq(after.st_mode & S_IFMT, kind);
    ck_assert_uint_eq(after.st_ino, before.st_ino);
}

START_TEST(saves_replace_only_regular_files)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 4, 8, 3);
    char *fifo = tu_tmp_path("save.fifo");
    unlink(fifo);
    ck_assert_int_eq(mkfifo(fifo, 0644), 0);
    assert_save_refused(m, fifo, S_IFIFO);

    char *dir = tu_tmp_path("save.dir");
    rmdir(dir);
    ck_assert_int_eq(mkdir(dir, 0755), 0);
    assert_save_refused(m, dir, S_IFDIR);

    char *target = tu_tmp_path("save.target"), *link = tu_tmp_path("save.link");
    tu_write_file(target, "keep", 4);
    unlink(link);
    ck_assert_int_eq(symlink(target, link), 0);
    assert_save_refused(m, link, S_IFLNK);
    size_t size;
    unsigned char *kept = tu_read_file(target, &size);
    ck_assert(size == 4 && memcmp(kept, "keep", 4) == 0);
    free(kept);

    /* A device node, as /dev/null is: made here (root only) rather than risking the real one. */
    char *dev = tu_tmp_path("save.null");
    unlink(dev);
    if (mknod(dev, S_IFCHR | 0666, makedev(1, 3)) == 0)
        assert_save_refused(m, dev, S_IFCHR);
    else
        fprintf(stderr, "saves_replace_only_regular_files: device case skipped (mknod: %s)\n",
                strerror(errno));
    free(fifo);
    free(dir);
    free(target);
    free(link);
    free(dev);
    sae_model_free(m);
}
END_TEST

START_TEST(loading_a_fifo_fails_at_once)
{
    /* A FIFO with no writer: open() without O_NONBLOCK would wait forever (the case timeout
     * catches a hang). As the weights, as cfg.json beside real weights, and as a .npy. */
    char *fifo = tu_tmp_path("load.fifo");
    unlink(fifo);
    ck_assert_int_eq(mkfifo(fifo, 0644), 0);
    sae_model *m = NULL;
    ck_assert_sae(sae_model_load(&m, fifo), SAE_EIO);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "FIFO"));
    ck_assert_sae(sae_model_load_with(&m, fifo, SAE_LOAD_COPY), SAE_EIO);
    sae_npy *a = NULL;
    ck_assert_sae(sae_npy_open(&a, fifo), SAE_EIO);
    ck_assert_ptr_null(a);

    char *dir = tu_tmp_path("fifo-cfg");
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir '%s'", dir, dir);
    ck_assert_int_eq(system(cmd), 0);
    sae_model *src = tu_random_model(SAE_ARCH_RELU, 4, 8, 4);
    char weights[512], cfg[512];
    snprintf(weights, sizeof weights, "%s/sae_weights.safetensors", dir);
    snprintf(cfg, sizeof cfg, "%s/cfg.json", dir);
    ck_assert_ok(sae_model_save(src, weights));
    ck_assert_int_eq(mkfifo(cfg, 0644), 0);
    ck_assert_sae(sae_model_load(&m, dir), SAE_EIO);
    ck_assert_ptr_null(m);
    sae_model_free(src);
    free(dir);
    free(fifo);
}
END_TEST

static void encode_all(const sae_model *m, const float *x, float *f)
{
    ck_assert_ok(sae_encode(m, x, N, f));
}

START_TEST(a_copied_model_survives_its_file)
{
    sae_model *src = tu_random_model(SAE_ARCH_TOPK, D_IN, D_SAE, 5);
    char *path = tu_tmp_path("copy.safetensors");
    ck_assert_ok(sae_model_save(src, path));
    float x[N * D_IN], want[N * D_SAE], got[N * D_SAE];
    tu_rng r = {6};
    tu_fill(&r, x, N * D_IN, -1, 1);
    encode_all(src, x, want);

    sae_model *m;
    ck_assert_ok(sae_model_load_with(&m, path, SAE_LOAD_COPY));
    /* Another process truncating, then rewriting the file with other weights. */
    ck_assert_int_eq(truncate(path, 0), 0);
    encode_all(m, x, got);
    ck_assert_mem_eq(got, want, sizeof want);
    sae_model *other = tu_random_model(SAE_ARCH_TOPK, D_IN, D_SAE, 99);
    ck_assert_ok(sae_model_save(other, path));
    encode_all(m, x, got);
    ck_assert_mem_eq(got, want, sizeof want);
    ck_assert_int_eq(unlink(path), 0);
    encode_all(m, x, got);
    ck_assert_mem_eq(got, want, sizeof want);
    /* The copy is the model's own: it saves and reloads like any other. */
    ck_assert_ok(sae_model_save(m, path));
    sae_model *again;
    ck_assert_ok(sae_model_load(&again, path));
    encode_all(again, x, got);
    ck_assert_mem_eq(got, want, sizeof want);
    sae_model_free(again);
    sae_model_free(other);
    sae_model_free(m);
    sae_model_free(src);
    free(path);
}
END_TEST

enum { SIGBUS_SEEN = 42 };
static void on_sigbus(int sig)
{
    (void)sig;
    _exit(SIGBUS_SEEN);
}

START_TEST(a_mapped_model_is_what_load_with_copy_avoids)
{
    /* The documented trade-off, shown in a child: the default load maps the file, and another
     * process truncating it makes the next encode fault. This is why SAE_LOAD_COPY exists. */
    sae_model *src = tu_random_model(SAE_ARCH_RELU, 256, 1024, 7);
    char *path = tu_tmp_path("mapped.safetensors");
    ck_assert_ok(sae_model_save(src, path));
    sae_model_free(src);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        /* A handler of our own, so that the result reads the same under AddressSanitizer
         * (which otherwise reports the fault and exits 1). */
        struct sigaction sa = {0};
        sa.sa_handler = on_sigbus;
        sigaction(SIGBUS, &sa, NULL);
        sae_model *m;
        if (sae_model_load(&m, path) != SAE_OK || truncate(path, 0) != 0)
            _exit(2);
        static float x[256], f[1024];
        (void)sae_encode(m, x, 1, f);
        _exit(0);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == SIGBUS_SEEN,
                  "expected the mapped model to fault after truncation (status %d)", status);
    free(path);
}
END_TEST

START_TEST(load_flags_are_checked)
{
    sae_model *m = (sae_model *)&m;
    ck_assert_sae(sae_model_load_with(&m, "x", 2), SAE_EINVAL);
    ck_assert_ptr_null(m);
    ck_assert_sae(sae_model_load_with(NULL, "x", 0), SAE_EINVAL);
    ck_assert_sae(sae_model_load_with(&m, NULL, SAE_LOAD_COPY), SAE_EINVAL);
    ck_assert_sae(sae_model_load_with(&m, "/nonexistent/sae", SAE_LOAD_COPY), SAE_EIO);
}
END_TEST

START_TEST(float_parameters_are_checked_as_floats)
{
    sae_model *m = tu_random_model(SAE_ARCH_BATCHTOPK, 4, 8, 8);
    /* Finite and > 0 as doubles; 0, subnormal or infinite as floats. */
    const double bad_scale[] = {1e-46, 1e-40, 1e39, -1.0, 0.0, (double)NAN, (double)INFINITY};
    for (size_t i = 0; i < sizeof bad_scale / sizeof bad_scale[0]; i++)
        ck_assert_sae(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, bad_scale[i]), SAE_EINVAL);
    const double bad_theta[] = {1e-40, -1e-40, 1e39, -1e39, (double)NAN};
    for (size_t i = 0; i < sizeof bad_theta / sizeof bad_theta[0]; i++)
        ck_assert_sae(sae_model_set_param(m, SAE_PARAM_THRESHOLD, bad_theta[i]), SAE_EINVAL);
    double v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &v));
    ck_assert(v == 1.0);
    /* The bounds themselves are accepted, and whatever is accepted saves and reloads. */
    double lo, hi;
    ck_assert_ok(sae_model_param_bounds(SAE_PARAM_INPUT_SCALE, &lo, &hi));
    ck_assert(lo == FLT_MIN && hi == FLT_MAX);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, lo));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, -FLT_MAX));
    char *path = tu_tmp_path("bounds.safetensors");
    ck_assert_ok(sae_model_save(m, path));
    sae_model *back;
    ck_assert_ok(sae_model_load(&back, path));
    ck_assert_ok(sae_model_get_param(back, SAE_PARAM_INPUT_SCALE, &v));
    ck_assert(v == FLT_MIN);
    sae_model_free(back);
    free(path);
    sae_model_free(m);
}
END_TEST

START_TEST(parameter_bounds_match_the_setter)
{
    static const sae_model_param params[] = {SAE_PARAM_K, SAE_PARAM_APPLY_B_DEC_TO_INPUT,
                                             SAE_PARAM_INPUT_SCALE, SAE_PARAM_THRESHOLD,
                                             SAE_PARAM_THREADS};
    sae_model *m = tu_random_model(SAE_ARCH_BATCHTOPK, 4, 8, 9);
    for (size_t i = 0; i < sizeof params / sizeof params[0]; i++) {
        double lo, hi;
        ck_assert_ok(sae_model_param_bounds(params[i], &lo, &hi));
        ck_assert(lo <= hi);
        ck_assert_ok(sae_model_set_param(m, params[i], lo));
        ck_assert_ok(sae_model_set_param(m, params[i], hi));
        double below = lo > 0 ? lo / 2 : lo < 0 ? lo * 2 : -1.0;
        double above = hi > 0 ? hi * 2 : 1.0;
        ck_assert_sae(sae_model_set_param(m, params[i], below), SAE_EINVAL);
        ck_assert_sae(sae_model_set_param(m, params[i], above), SAE_EINVAL);
    }
    double lo, hi;
    ck_assert_sae(sae_model_param_bounds((sae_model_param)99, &lo, &hi), SAE_EINVAL);
    ck_assert_sae(sae_model_param_bounds((sae_model_param)0, &lo, &hi), SAE_EINVAL);
    ck_assert_sae(sae_model_param_bounds(SAE_PARAM_K, NULL, &hi), SAE_EINVAL);
    sae_model_free(m);
}
END_TEST

static size_t physical_memory(void)
{
    struct sysinfo si;
    ck_assert_int_eq(sysinfo(&si), 0);
    return (size_t)si.totalram * si.mem_unit;
}

START_TEST(sizes_beyond_the_machine_are_enomem)
{
    /* Each block alone fits in memory, all of them together do not: granted by overcommit, the
     * zeroing would get the process OOM-killed. */
    size_t ram = physical_memory();
    size_t d_sae = ram / 16; /* 24 bytes of per-feature state each: 1.5x the machine */
    if (d_sae > UINT32_MAX)
        d_sae = UINT32_MAX; /* a larger machine still fails on top_n below */
    sae_stats *st = NULL;
    ck_assert_sae(sae_stats_new(&st, d_sae, 0), SAE_ENOMEM);
    ck_assert_ptr_null(st);
    ck_assert_sae(sae_stats_new(&st, 1024, ram / 1024 / 8), SAE_ENOMEM);
    /* Two weight matrices of 0.75x the machine each. */
    size_t d_in = 4096, width = ram / 4 * 3 / 4 / d_in;
    if (width <= INT32_MAX) {
        sae_model *m = NULL;
        ck_assert_sae(sae_model_new(&m, SAE_ARCH_RELU, d_in, width), SAE_ENOMEM);
        ck_assert_ptr_null(m);
    }
}
END_TEST

static Suite *host_suite(void)
{
    Suite *s = suite_create("host");
    TCase *tc = tcase_create("host");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, concurrent_saves_leave_the_umask_alone);
    tcase_add_test(tc, a_replaced_file_keeps_its_permissions);
    tcase_add_test(tc, saves_replace_only_regular_files);
    tcase_add_test(tc, loading_a_fifo_fails_at_once);
    tcase_add_test(tc, a_copied_model_survives_its_file);
    tcase_add_test(tc, a_mapped_model_is_what_load_with_copy_avoids);
    tcase_add_test(tc, load_flags_are_checked);
    tcase_add_test(tc, float_parameters_are_checked_as_floats);
    tcase_add_test(tc, parameter_bounds_match_the_setter);
    tcase_add_test(tc, sizes_beyond_the_machine_are_enomem);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(host_suite)
