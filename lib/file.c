/* Reading files whole (mapped or copied) and replacing them atomically. */

#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int sae__map_file(const char *path, sae__map *map)
{
    map->data = NULL;
    map->size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return sae__fail(SAE_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return sae__fail(SAE_EIO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return sae__fail(SAE_EIO, "%s: not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return sae__fail(SAE_EFORMAT, "%s: the file is empty", path);
    }
    if ((uintmax_t)st.st_size > SIZE_MAX) {
        close(fd);
        return sae__fail(SAE_EFORMAT, "%s: too large to map", path);
    }
    size_t size = (size_t)st.st_size;
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
    if (map->data != NULL)
        munmap(map->data, map->size);
    map->data = NULL;
    map->size = 0;
}

int sae__read_small_file(const char *path, size_t max, char **out, size_t *size)
{
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (fp == NULL)
        return sae__fail(SAE_EIO, "%s: cannot open: %s", path, strerror(errno));
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            if (cap > max) {
                free(buf);
                fclose(fp);
                return sae__fail(SAE_EFORMAT, "%s: larger than %zu bytes", path, max);
            }
            cap = cap ? cap * 2 : 4096;
            char *grown = realloc(buf, cap + 1);
            if (grown == NULL) {
                free(buf);
                fclose(fp);
                return sae__fail(SAE_ENOMEM, "%s: cannot allocate %zu bytes", path, cap);
            }
            buf = grown;
        }
        size_t got = fread(buf + len, 1, cap - len, fp);
        len += got;
        if (got == 0)
            break;
    }
    int bad = ferror(fp);
    fclose(fp);
    if (bad) {
        free(buf);
        return sae__fail(SAE_EIO, "%s: read error", path);
    }
    if (len > max) {
        free(buf);
        return sae__fail(SAE_EFORMAT, "%s: larger than %zu bytes", path, max);
    }
    buf[len] = '\0';
    *out = buf;
    if (size)
        *size = len;
    return SAE_OK;
}

int sae__atomic_begin(sae__atomic_file *f, const char *path)
{
    f->fd = -1;
    f->failed = 0;
    f->path = path;
    size_t len = strlen(path);
    static const char suffix[] = ".tmp-XXXXXX";
    f->tmp_path = malloc(len + sizeof suffix);
    if (f->tmp_path == NULL)
        return sae__fail(SAE_ENOMEM, "%s: cannot allocate a temporary name", path);
    memcpy(f->tmp_path, path, len);
    memcpy(f->tmp_path + len, suffix, sizeof suffix);
    f->fd = mkostemp(f->tmp_path, O_CLOEXEC);
    if (f->fd < 0) {
        int e = errno;
        free(f->tmp_path);
        f->tmp_path = NULL;
        return sae__fail(SAE_EIO, "%s: cannot create a temporary file beside it: %s", path,
                         strerror(e));
    }
    /* mkstemp makes the file 0600; a saved model should get the usual permissions. */
    mode_t mask = umask(0);
    umask(mask);
    if (fchmod(f->fd, 0666 & ~mask) != 0) {
        int e = errno;
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
        ssize_t w = write(f->fd, p, size);
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
    if (rename(f->tmp_path, f->path) != 0) {
        int e = errno;
        sae__atomic_abort(f);
        return sae__fail(SAE_EIO, "%s: cannot rename the temporary file over it: %s", f->path,
                         strerror(e));
    }
    /* The rename itself must reach the disk for the new file to survive a crash. */
    char *dir = strdup(f->tmp_path);
    if (dir != NULL) {
        int dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            (void)fsync(dfd);
            close(dfd);
        }
        free(dir);
    }
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
