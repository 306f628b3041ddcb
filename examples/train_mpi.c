/* Data-parallel training with Open MPI through sae_trainer_set_allreduce: every process steps on
 * its own share of each global batch, the trainer's gradient buffer is summed with MPI_Allreduce,
 * and every process takes the same step, so all hold the same weights.
 *
 *   mpirun -np P train_mpi [options] ACTS.npy
 *     --arch topk|batchtopk|relu|jumprelu|matryoshka  (topk)   --latents N  (8 * d_in)   --k K (32)
 *                   (matryoshka: BatchTopK with groups d_sae/32, /16, /8, /4 and the rest)
 *     --batch N     tokens per process per step (1024)     --steps N (200)   --seed N (0)
 *     --lr X        --out PATH  (rank 0 saves the model there)
 *     --target Y.npy  a transcoder predicting Y's rows from ACTS's (same row count); --skip gives
 *                   it an affine skip W_skip
 *     --selftest    rank 0 also steps a second trainer alone on each combined batch, from the
 *                   data-parallel trainer's state (weights, Adam moments, dead counters, copied
 *                   through a checkpoint before every step), and checks that the step gives the
 *                   same weights to float tolerance; then every process checks that all
 *                   processes hold bit-identical weights. BatchTopK (and Matryoshka) select
 *                   within each process's share, so there the second trainer computes each
 *                   share's gradient sums in turn (an allreduce hook that keeps them and fails
 *                   the step, which changes nothing) and steps on their total.
 *
 * Global step s uses rows [s * P * N, (s + 1) * P * N) of the file (wrapping around), and process
 * r takes the r-th slice of N rows. Every process initializes from the same first rows. */
#define _POSIX_C_SOURCE 200809L /* mkstemp */
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sae.h"

/* The hook: one MPI_Allreduce (in pieces if the buffer is longer than an int can count). */
static int mpi_allreduce(float *buf, size_t count, void *user)
{
    MPI_Comm comm = *(MPI_Comm *)user;
    while (count > 0) {
        int piece = count > (size_t)INT_MAX ? INT_MAX : (int)count;
        if (MPI_Allreduce(MPI_IN_PLACE, buf, piece, MPI_FLOAT, MPI_SUM, comm) != MPI_SUCCESS)
            return -1;
        buf += piece;
        count -= (size_t)piece;
    }
    return 0;
}

/* Rows [first, first + n) of the file, wrapping around its end. */
static int read_wrapped(sae_npy *a, size_t first, size_t n, float *dst)
{
    size_t rows = sae_npy_rows(a), cols = sae_npy_cols(a);
    first %= rows;
    while (n > 0) {
        size_t take = rows - first < n ? rows - first : n;
        if (sae_npy_read(a, first, take, dst) != SAE_OK)
            return -1;
        dst += take * cols;
        n -= take;
        first = 0;
    }
    return 0;
}

static void die(int rank, const char *what)
{
    fprintf(stderr, "rank %d: %s: %s\n", rank, what, sae_last_error());
    MPI_Abort(MPI_COMM_WORLD, 1);
}

/* W_enc, W_dec, b_enc, b_dec, (has_skip) W_skip and a JumpReLU model's threshold, in one array. */
static float *all_weights(const sae_model *m, int has_skip, size_t *count)
{
    size_t d = sae_model_d_in(m), s = sae_model_d_sae(m), o = sae_model_d_out(m), w = d * s;
    size_t skip = has_skip ? d * o : 0, th = sae_model_arch(m) == SAE_ARCH_JUMPRELU ? s : 0;
    *count = w + s * o + s + o + skip + th;
    float *v = malloc(*count * sizeof(float));
    if (v == NULL || sae_model_get_tensor(m, SAE_W_ENC, v) != SAE_OK ||
        sae_model_get_tensor(m, SAE_W_DEC, v + w) != SAE_OK ||
        sae_model_get_tensor(m, SAE_B_ENC, v + w + s * o) != SAE_OK ||
        sae_model_get_tensor(m, SAE_B_DEC, v + w + s * o + s) != SAE_OK ||
        (skip && sae_model_get_tensor(m, SAE_W_SKIP, v + w + s * o + s + o) != SAE_OK) ||
        (th && sae_model_get_tensor(m, SAE_THRESHOLD, v + w + s * o + s + o + skip) != SAE_OK)) {
        free(v);
        return NULL;
    }
    return v;
}

/* The selftest's hook for BatchTopK: mode 0 adds the share's sums to acc and fails the step
 * (which leaves the trainer unchanged); mode 1 hands over the total. */
typedef struct {
    float *acc;
    int mode;
} shares;

static int shares_allreduce(float *buf, size_t count, void *user)
{
    shares *sh = user;
    if (sh->acc == NULL && (sh->acc = calloc(count, sizeof(float))) == NULL)
        return -1;
    if (sh->mode == 0) {
        for (size_t i = 0; i < count; i++)
            sh->acc[i] += buf[i];
        return 1;
    }
    memcpy(buf, sh->acc, count * sizeof(float));
    memset(sh->acc, 0, count * sizeof(float));
    return 0;
}

static sae_trainer *make(sae_model **m, sae_arch arch, size_t d_in, size_t latents, size_t d_out,
                         int skip, size_t k, double lr, size_t steps, size_t seed, int rank,
                         int matryoshka)
{
    sae_trainer *t;
    size_t groups[6], n_groups = 0, used = 0;
    for (size_t div = 32; matryoshka && div >= 4; div /= 2)
        if (latents / div > 0)
            used += groups[n_groups++] = latents / div;
    groups[n_groups++] = latents - used;
    if ((d_out ? sae_model_new_transcoder(m, arch, d_in, latents, d_out, skip)
               : sae_model_new(m, arch, d_in, latents)) != SAE_OK ||
        ((arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK) &&
         sae_model_set_param(*m, SAE_PARAM_K, (double)k) != SAE_OK) ||
        sae_trainer_new(&t, *m) != SAE_OK ||
        (matryoshka && sae_trainer_set_groups(t, groups, n_groups) != SAE_OK) ||
        sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, (double)steps) != SAE_OK ||
        sae_trainer_set_param(t, SAE_TRAIN_SEED, (double)seed) != SAE_OK ||
        /* a short run: let latents die (and AuxK act) within it */
        sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 20000) != SAE_OK ||
        (lr > 0 && sae_trainer_set_param(t, SAE_TRAIN_LR, lr) != SAE_OK))
        die(rank, "creating the trainer");
    return t;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm comm = MPI_COMM_WORLD;
    int rank, procs;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &procs);

    sae_arch arch = SAE_ARCH_TOPK;
    size_t latents = 0, k = 32, batch = 1024, steps = 200, seed = 0;
    double lr = 0;
    int selftest = 0, skip = 0, i = 1, matryoshka = 0;
    const char *out = NULL, *target = NULL;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--selftest") == 0 || strcmp(argv[i], "--skip") == 0) {
            *(argv[i][3] == 'e' ? &selftest : &skip) = 1;
            continue;
        }
        if (i + 1 >= argc)
            break;
        const char *opt = argv[i], *val = argv[++i];
        if (strcmp(opt, "--arch") == 0 && strcmp(val, "matryoshka") == 0) {
            arch = SAE_ARCH_BATCHTOPK, matryoshka = 1;
            continue;
        }
        if (strcmp(opt, "--arch") == 0 && sae_arch_from_name(val, &arch) == SAE_OK)
            continue;
        if (strcmp(opt, "--latents") == 0)
            latents = (size_t)atol(val);
        else if (strcmp(opt, "--k") == 0)
            k = (size_t)atol(val);
        else if (strcmp(opt, "--batch") == 0)
            batch = (size_t)atol(val);
        else if (strcmp(opt, "--steps") == 0)
            steps = (size_t)atol(val);
        else if (strcmp(opt, "--seed") == 0)
            seed = (size_t)atol(val);
        else if (strcmp(opt, "--lr") == 0)
            lr = atof(val);
        else if (strcmp(opt, "--out") == 0)
            out = val;
        else if (strcmp(opt, "--target") == 0)
            target = val;
        else {
            if (rank == 0)
                fprintf(stderr, "bad option %s %s\n", opt, val);
            MPI_Finalize();
            return 2;
        }
    }
    if (i != argc - 1 || batch == 0 || k == 0) {
        if (rank == 0)
            fprintf(stderr, "usage: mpirun -np P train_mpi [--arch A] [--latents N] [--k K] "
                            "[--batch N] [--steps N] [--seed N] [--lr X] [--out PATH] "
                            "[--target Y.npy [--skip]] [--selftest] ACTS.npy\n");
        MPI_Finalize();
        return 2;
    }
    sae_npy *a;
    if (sae_npy_open(&a, argv[i]) != SAE_OK)
        die(rank, argv[i]);
    sae_npy *b = NULL;
    if (target != NULL && sae_npy_open(&b, target) != SAE_OK)
        die(rank, target);
    if (b != NULL && sae_npy_rows(b) != sae_npy_rows(a)) {
        if (rank == 0)
            fprintf(stderr, "%s has %zu rows, %s has %zu\n", target, sae_npy_rows(b), argv[i],
                    sae_npy_rows(a));
        MPI_Abort(comm, 2);
    }
    const size_t d_in = sae_npy_cols(a), P = (size_t)procs, d_out = b ? sae_npy_cols(b) : 0;
    const size_t d_y = d_out ? d_out : 1;
    if (latents == 0)
        latents = 8 * d_in;

    sae_model *m, *ref_m = NULL;
    sae_trainer *t = make(&m, arch, d_in, latents, d_out, skip, k, lr, steps, seed, rank,
                          matryoshka),
                *ref = NULL;
    size_t init_rows = sae_npy_rows(a) < 8192 ? sae_npy_rows(a) : 8192;
    float *x = malloc(P * batch * d_in * sizeof(float));
    float *init = malloc(init_rows * d_in * sizeof(float));
    float *y = malloc(P * batch * d_y * sizeof(float));
    float *init_y = malloc(init_rows * d_y * sizeof(float));
    if (x == NULL || init == NULL || y == NULL || init_y == NULL ||
        read_wrapped(a, 0, init_rows, init) != 0 ||
        (b != NULL && read_wrapped(b, 0, init_rows, init_y) != 0))
        die(rank, "reading the init sample");
    if ((b ? sae_trainer_init_to(t, init, init_y, init_rows)
           : sae_trainer_init(t, init, init_rows)) != SAE_OK)
        die(rank, "init");
    if (sae_trainer_set_allreduce(t, mpi_allreduce, &comm) != SAE_OK)
        die(rank, "set_allreduce");
    /* Each step is checked from the same state on both sides: over hundreds of steps, sums in
     * another order (the allreduce's) drift apart by rounding until a near-tie among TopK's
     * pre-activations goes the other way and a latent learns in one run only. */
    char state[] = "/tmp/train_mpi-state-XXXXXX";
    if (selftest && rank == 0) {
        ref = make(&ref_m, arch, d_in, latents, d_out, skip, k, lr, steps, seed, rank, matryoshka);
        int fd = mkstemp(state);
        if (fd < 0)
            die(rank, "creating the state file");
        close(fd);
    }

    shares sh = {NULL, 0};
    double worst = 0.0, start = MPI_Wtime();
    int failed = 0;
    for (size_t s = 0; s < steps && !failed; s++) {
        size_t global_first = s * P * batch;
        /* Rank 0 in a selftest reads the whole global batch; the others only their slice. */
        if (ref != NULL) {
            if (read_wrapped(a, global_first, P * batch, x) != 0 ||
                (b != NULL && read_wrapped(b, global_first, P * batch, y) != 0))
                die(rank, "reading");
        } else if (read_wrapped(a, global_first + (size_t)rank * batch, batch,
                                x + (size_t)rank * batch * d_in) != 0 ||
                   (b != NULL && read_wrapped(b, global_first + (size_t)rank * batch, batch,
                                              y + (size_t)rank * batch * d_out) != 0)) {
            die(rank, "reading");
        }
        if (ref != NULL &&
            (sae_trainer_save(t, state) != SAE_OK || sae_trainer_load(ref, state) != SAE_OK))
            die(rank, "copying the trainer's state");
        const float *xr = x + (size_t)rank * batch * d_in, *yr = y + (size_t)rank * batch * d_out;
        if ((b ? sae_trainer_step_to(t, xr, yr, batch) : sae_trainer_step(t, xr, batch)) != SAE_OK)
            die(rank, "step");
        if (ref != NULL && arch == SAE_ARCH_BATCHTOPK) {
            /* Each share's sums in turn, then a step on their total. */
            if (sae_trainer_set_allreduce(ref, shares_allreduce, &sh) != SAE_OK)
                die(rank, "set_allreduce");
            for (size_t r = 0; r <= P; r++) {
                const size_t q = r < P ? r : 0;
                sh.mode = r < P ? 0 : 1;
                int rc = b ? sae_trainer_step_to(ref, x + q * batch * d_in,
                                                 y + q * batch * d_out, batch)
                           : sae_trainer_step(ref, x + q * batch * d_in, batch);
                if (rc != (r < P ? SAE_ECALLBACK : SAE_OK))
                    die(rank, "reference step");
            }
        } else if (ref != NULL) {
            if ((b ? sae_trainer_step_to(ref, x, y, P * batch)
                   : sae_trainer_step(ref, x, P * batch)) != SAE_OK)
                die(rank, "reference step");
        }
        if (ref != NULL) {
            size_t n;
            float *w = all_weights(m, skip && b, &n), *wr = all_weights(ref_m, skip && b, &n);
            if (w == NULL || wr == NULL)
                die(rank, "reading weights");
            double diff = 0.0;
            for (size_t j = 0; j < n; j++) {
                double d = fabs((double)w[j] - wr[j]) / (1.0 + fabs((double)wr[j]));
                diff = d > diff ? d : diff;
            }
            double fvu, fvu_ref;
            sae_trainer_get_metric(t, SAE_METRIC_FVU, &fvu);
            sae_trainer_get_metric(ref, SAE_METRIC_FVU, &fvu_ref);
            worst = diff > worst ? diff : worst;
            /* One step's sums in another order: float rounding, amplified at most by Adam's
             * division by the root of the second moment. */
            if (diff > 1e-5 || fabs(fvu - fvu_ref) > 1e-5 * (1.0 + fvu_ref)) {
                fprintf(stderr, "step %zu: data-parallel weights differ from one process by %g "
                                "(FVU %g vs %g)\n", s + 1, diff, fvu, fvu_ref);
                failed = 1;
            }
            free(w);
            free(wr);
        }
        if (selftest) /* everyone stops together rather than waiting in the next allreduce */
            MPI_Bcast(&failed, 1, MPI_INT, 0, comm);
        if (rank == 0 && ((s + 1) % 50 == 0 || s + 1 == steps)) {
            double loss, fvu, l0, dead;
            sae_trainer_get_metric(t, SAE_METRIC_LOSS, &loss);
            sae_trainer_get_metric(t, SAE_METRIC_FVU, &fvu);
            sae_trainer_get_metric(t, SAE_METRIC_L0, &l0);
            sae_trainer_get_metric(t, SAE_METRIC_DEAD_FRACTION, &dead);
            printf("step %zu/%zu  %d processes  %.0f tok/s  loss %.4f  fvu %.4f  l0 %.1f  "
                   "dead %.1f%%\n", s + 1, steps, procs,
                   (double)((s + 1) * P * batch) / (MPI_Wtime() - start), loss, fvu, l0,
                   100 * dead);
            fflush(stdout);
        }
    }
    MPI_Bcast(&failed, 1, MPI_INT, 0, comm);
    if (selftest && !failed) {
        /* Every process must hold exactly the same weights: compare each with rank 0's. */
        size_t n;
        float *w = all_weights(m, skip && b, &n), *w0 = malloc(n * sizeof(float));
        if (w == NULL || w0 == NULL)
            die(rank, "reading weights");
        memcpy(w0, w, n * sizeof(float));
        MPI_Bcast(w0, (int)n, MPI_FLOAT, 0, comm);
        int same = memcmp(w, w0, n * sizeof(float)) == 0, all_same;
        MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, comm);
        if (!all_same) {
            if (rank == 0)
                fprintf(stderr, "the processes' weights are not identical\n");
            failed = 1;
        }
        free(w);
        free(w0);
        if (rank == 0 && !failed)
            printf("selftest passed: %zu %s%s steps on %d processes equal one process on the "
                   "%s (largest relative weight difference %.3g)\n",
                   steps, matryoshka ? "matryoshka" : sae_arch_name(arch), b ? (skip ? " skip transcoder" : " transcoder") : "",
                   procs, arch == SAE_ARCH_BATCHTOPK ? "processes' shares" : "combined batches",
                   worst);
    }
    if (out != NULL && rank == 0 && !failed && sae_model_save(m, out) != SAE_OK)
        die(rank, "saving");
    if (ref != NULL)
        unlink(state);
    free(sh.acc);
    free(x);
    free(init);
    free(y);
    free(init_y);
    sae_npy_close(a);
    sae_npy_close(b);
    sae_trainer_free(t);
    sae_trainer_free(ref);
    sae_model_free(m);
    sae_model_free(ref_m);
    MPI_Finalize();
    return failed;
}
