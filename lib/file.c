/* Reading files whole (mapped or copied) and replacing them atomically, without ever touching
 * process-wide state (the umask, signal handlers) or blocking on something that is not a file. */

#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *kind_of(mode_t mode)
{
    if (S_ISDIR(mode))
        return "a directory";
    if (S_ISFIFO(mode))
        return "a FIFO";
    if (S_ISCHR(mode))
        return "a character device";
    if (S_ISBLK(mode))
        return "a block device";
    if (S_ISSOCK(mode))
        return "a socket";
    if (S_ISLNK(mode))
        return "a symbolic link";
    return "not a regular file";
}

int sae__open_regular(const char *path, int *fd_out, struct stat *st)
{
    *fd_out = -1;
    /* O_NONBLOCK: opening a FIFO with no writer (or a device that waits for carrier) returns
     * at once instead of hanging the host; fstat then tells what it is. On a regular file the
     * flag changes nothing, and it is cleared anyway so later reads are plain. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0)
        return sae__fail(SAE_EIO, "%s: cannot open: %s", path, strerror(errno));
    if (fstat(fd, st) != 0) {
        int e = errno;
        close(fd);
        return sae__fail(SAE_EIO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st->st_mode)) {
        close(fd);
        return sae__fail(SAE_EIO, "%s: is %s; libsae reads regular files only", path,
                         kind_of(st->st_mode));
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0)
        (void)fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    *fd_out = fd;
    return SAE_OK;
}

/* Reads exactly size bytes from fd into buf; a file that shrank meanwhile is SAE_EFORMAT. */
static int read_all(int fd, unsigned char *buf, size_t size, const char *path)
{
    size_t done = 0;
    while (done < size) {
        size_t chunk = size - done < (size_t)1 << 30 ? size - done : (size_t)1 << 30;
        ssize_t got = read(fd, buf + done, chunk);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return sae__fail(SAE_EIO, "%s: read failed at byte %zu: %s", path, done,
                             strerror(errno));
        if (got == 0)
            return sae__fail(SAE_EFORMAT, "%s: the file ended at byte %zu of %zu (truncated "
                             "while being read?)", path, done, size);
        done += (size_t)got;
    }
    return SAE_OK;
}

int sae__map_file(const char *path, sae__map *map, bool copy)
{
    *map = (sae__map){0};
    struct stat st;
    int fd;
    int rc = sae__open_regular(path, &fd, &st);
    if (rc != SAE_OK)
        return rc;
    if (st.st_size == 0) {
        close(fd);
        return sae__fail(SAE_EFORMAT, "%s: the file is empty", path);
    }
    if ((uintmax_t)st.st_size > SIZE_MAX) {
        close(fd);
        return sae__fail(SAE_EFORMAT, "%s: too large to map", path);
    }
    size_t size = (size_t)st.st_size;
    if (copy) {
        /* The model's own memory, filled by read(): the file may then shrink, change or vanish
         * without reaching the model, where a mapping would raise SIGBUS. */
        unsigned char *buf = sae__alloc(size, 1, path);
        if (buf == NULL) {
            close(fd);
            return SAE_ENOMEM;
        }
        rc = read_all(fd, buf, size, path);
        close(fd);
        if (rc != SAE_OK) {
            free(buf);
            return rc;
        }
        map->data = buf;
        map->size = size;
        map->heap = true;
        return SAE_OK;
    }
    /* Private and writable: tensors used in place can still be overwritten by set_tensor or a
     * trainer, the kernel copying only the pages touched; the file never changes. */
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED)
        return sae__fail(SAE_EIO, "%s: cannot map %zu bytes: %s", path, size, strerror(e));
    map->data = p;
    map->size = size;
    return SAE_OK;
}

void sae__unmap(sae__map *map)
{
    if (map->data != NULL) {
        if (map->heap)
            free(map->data);
        else
            munmap(map->data, map->size);
    }
    *map = (sae__map){0};
}

int sae__read_small_file(const char *path, size_t max, char **out, size_t *size)
{
    *out = NULL;
    struct stat st;
    int fd;
    int rc = sae__open_regular(path, &fd, &st);
    if (rc != SAE_OK)
        return rc;
    if ((uintmax_t)st.st_size > max) {
        close(fd);
        return sae__fail(SAE_EFORMAT, "%s: larger than %zu bytes", path, max);
    }
    /* One byte beyond the size stat gave catches a file that grew meanwhile. */
    size_t cap = (size_t)st.st_size + 1;
    char *buf = malloc(cap + 1);
    if (buf == NULL) {
        close(fd);
        return sae__fail(SAE_ENOMEM, "%s: cannot allocate %zu bytes", path, cap);
    }
    size_t len = 0;
    for (;;) {
        ssize_t got = read(fd, buf + len, cap - len);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            int e = errno;
            free(buf);
            close(fd);
            return sae__fail(SAE_EIO, "%s: read error: %s", path, strerror(e));
        }
        if (got == 0 || (len += (size_t)got) == cap)
            break;
    }
    close(fd);
    if (len == cap || len > max) {
        free(buf);
        return sae__fail(SAE_EFORMAT, "%s: the file grew while being read", path);
    }
    buf[len] = '\0';
    *out = buf;
    if (size)
        *size = len;
    return SAE_OK;
}

/* The destination may be absent or a regular file. Replacing anything else would be a disaster
 * for the host (a save to /dev/null run as root replaced /dev/null), and a symbolic link would
 * be replaced by a file rather than followed; both are refused. *mode gets the permissions the
 * new file should have: the old file's, or 0666 less the umask (which open() applies). */
static int check_destination(const char *path, bool *exists, mode_t *mode)
{
    struct stat st;
    *exists = false;
    if (lstat(path, &st) != 0) {
        if (errno == ENOENT)
            return SAE_OK;
        return sae__fail(SAE_EIO, "%s: cannot stat: %s", path, strerror(errno));
    }
    if (!S_ISREG(st.st_mode))
        return sae__fail(SAE_EINVAL, "%s: is %s; libsae saves over regular files only", path,
                         kind_of(st.st_mode));
    *exists = true;
    *mode = st.st_mode & 07777;
    return SAE_OK;
}

/* A name no other process or thread will pick: getrandom, with a clock-and-counter fallback
 * (O_EXCL still guards against a clash). */
static void random_suffix(char *out, size_t len)
{
    static const char digits[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    unsigned char bytes[16];
    if (len > sizeof bytes)
        len = sizeof bytes;
    if (getrandom(bytes, len, GRND_NONBLOCK) != (ssize_t)len) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t v = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^
                     ((uint64_t)getpid() << 12) ^ (uint64_t)(uintptr_t)out;
        for (size_t i = 0; i < len; i++) {
            v = v * 6364136223846793005u + 1442695040888963407u;
            bytes[i] = (unsigned char)(v >> 56);
        }
    }
    for (size_t i = 0; i < len; i++)
        out[i] = digits[bytes[i] % (sizeof digits - 1)];
}

int sae__atomic_begin(sae__atomic_file *f, const char *path)
{
    f->fd = -1;
    f->failed = 0;
    f->path = path;
    f->tmp_path = NULL;
    bool exists;
    mode_t mode = 0666;
    int rc = check_destination(path, &exists, &mode);
    if (rc != SAE_OK)
        return rc;
    size_t len = strlen(path);
    enum { RANDOM = 12 };
    static const char tag[] = ".tmp-";
    f->tmp_path = malloc(len + sizeof tag + RANDOM);
    if (f->tmp_path == NULL)
        return sae__fail(SAE_ENOMEM, "%s: cannot allocate a temporary name", path);
    memcpy(f->tmp_path, path, len);
    memcpy(f->tmp_path + len, tag, sizeof tag - 1);
    char *suffix = f->tmp_path + len + sizeof tag - 1;
    suffix[RANDOM] = '\0';
    int e = EEXIST;
    for (int attempt = 0; attempt < 100 && f->fd < 0 && e == EEXIST; attempt++) {
        random_suffix(suffix, RANDOM);
        /* The kernel applies the umask to 0666 here, per call: unlike reading it with
         * umask(0); umask(mask), this changes nothing another thread could see. */
        f->fd = open(f->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0666);
        e = errno;
    }
    if (f->fd < 0) {
        free(f->tmp_path);
        f->tmp_path = NULL;
        return sae__fail(SAE_EIO, "%s: cannot create a temporary file beside it: %s", path,
                         strerror(e));
    }
    /* A file that is replaced keeps its permissions, as an editor saving it would. */
    if (exists && fchmod(f->fd, mode) != 0) {
        e = errno;
        sae__atomic_abort(f);
        return sae__fail(SAE_EIO, "%s: cannot set permissions: %s", path, strerror(e));
    }
    return SAE_OK;
}

int sae__atomic_write(sae__atomic_file *f, const void *data, size_t size)
{
    if (f->failed)
        return SAE_EIO;
    const unsigned char *p = data;
    while (size > 0) {
        size_t chunk = size < (size_t)1 << 30 ? size : (size_t)1 << 30;
        ssize_t w = write(f->fd, p, chunk);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            f->failed = 1;
            return sae__fail(SAE_EIO, "%s: write failed: %s", f->path,
                             w < 0 ? strerror(errno) : "no space written");
        }
        p += w;
        size -= (size_t)w;
    }
    return SAE_OK;
}

/* The folder of path, for syncing the rename: "." for a bare name, "/" for "/name". */
static void sync_folder(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir = slash == NULL ? strdup(".") : slash == path ? strdup("/")
                                                            : strndup(path, (size_t)(slash - path));
    if (dir == NULL)
        return;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    free(dir);
}

int sae__atomic_commit(sae__atomic_file *f)
{
    if (f->failed) {
        sae__atomic_abort(f);
        return SAE_EIO;
    }
    if (fsync(f->fd) != 0) {
        int e = errno;
        sae__atomic_abort(f);
        return sae__fail(SAE_EIO, "%s: cannot flush to disk: %s", f->path, strerror(e));
    }
    if (close(f->fd) != 0) {
        int e = errno;
        f->fd = -1;
        sae__atomic_abort(f);
        return sae__fail(SAE_EIO, "%s: close failed: %s", f->path, strerror(e));
    }
    f->fd = -1;
    /* Checked again just before the rename: the destination may have changed since begin. */
    bool exists;
    mode_t mode;
    int rc = check_destination(f->path, &exists, &mode);
    if (rc != SAE_OK) {
        sae__atomic_abort(f);
        return rc;
    }
    if (rename(f->tmp_path, f->path) != 0) {
        int e = errno;
        sae__atomic_abort(f);
        return sae__fail(SAE_EIO, "%s: cannot rename the temporary file over it: %s", f->path,
                         strerror(e));
    }
    /* The rename itself must reach the disk for the new file to survive a crash. */
    sync_folder(f->path);
    free(f->tmp_path);
    f->tmp_path = NULL;
    return SAE_OK;
}

void sae__atomic_abort(sae__atomic_file *f)
{
    if (f->fd >= 0)
        close(f->fd);
    f->fd = -1;
    if (f->tmp_path != NULL) {
        unlink(f->tmp_path);
        free(f->tmp_path);
        f->tmp_path = NULL;
    }
}
