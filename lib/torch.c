/* PyTorch .pt / .pth state dicts, read without PyTorch. torch.save (torch >= 1.6) writes a zip
 * archive whose members all sit in one folder, the "stem" ("archive", or in torch 2 the saved
 * file's name): <stem>/data.pkl, a pickle of the saved object in which every storage is a
 * persistent id ('storage', torch.FloatStorage, key, location, numel) naming the member
 * <stem>/data/<key> that holds its bytes; <stem>/version; in newer torch <stem>/byteorder and
 * <stem>/.data/... . Tensors are rebuilt by torch._utils._rebuild_tensor_v2(storage,
 * storage_offset, size, stride, requires_grad, backward_hooks[, metadata]).
 *
 * A pickle is a program for a stack machine that may import and call anything; this file runs
 * a restricted one: the opcodes of protocols 2-5 that build containers, numbers and strings, and
 * globals from a whitelist only, each of which becomes an inert value (a dict, a tensor
 * description, a storage class) rather than anything called. Sizes, indices, offsets and
 * strides are checked with overflow-checked arithmetic before use; the memo, the stack, marks
 * and the bytes the values take are bounded by the pickle's own length; nested dicts are
 * flattened to at most SAE__TORCH_MAX_DEPTH levels. */
#include "formats.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zip.h>

#define MAX_PICKLE ((size_t)256 << 20) /* data.pkl of a state dict is ~100 bytes per tensor */
#define MAX_STACK ((size_t)1 << 16)  /* the pickler batches SETITEMS/APPENDS by 1000 */
#define MAX_MARKS 1024u
#define MAX_MEMO ((size_t)1 << 24)
#define MAX_KEY 64u                  /* a storage key: torch writes decimal numbers */
#define MAX_NAME 1024u               /* a flattened entry name */
#define MAX_GLOBAL 256u              /* module or name of a GLOBAL */

/* ---- dtypes ------------------------------------------------------------------------------ */

size_t sae__torch_dtype_size(sae__torch_dtype t)
{
    static const size_t sizes[SAE__TORCH_DTYPE_COUNT] = {4, 2, 2, 8, 8, 4, 2, 1, 1, 1};
    return (unsigned)t < SAE__TORCH_DTYPE_COUNT ? sizes[t] : 0;
}

const char *sae__torch_dtype_name(sae__torch_dtype t)
{
    static const char *const names[SAE__TORCH_DTYPE_COUNT] = {"F32", "F16", "BF16", "F64", "I64",
                                                              "I32", "I16", "I8",  "U8",  "BOOL"};
    return (unsigned)t < SAE__TORCH_DTYPE_COUNT ? names[t] : "?";
}

static void convert(sae__torch_dtype t, const unsigned char *src, size_t n, float *dst)
{
    if (t <= SAE__TORCH_F64) {
        sae__to_float((sae__dtype)t, src, n, dst);
        return;
    }
    size_t es = sae__torch_dtype_size(t);
    for (size_t i = 0; i < n; i++, src += es) {
        uint64_t u = 0;
        for (size_t b = 0; b < es; b++)
            u |= (uint64_t)src[b] << (8 * b);
        int64_t v;
        switch (t) {
        case SAE__TORCH_I64: v = (int64_t)u; break;
        case SAE__TORCH_I32: v = (int32_t)(uint32_t)u; break;
        case SAE__TORCH_I16: v = (int16_t)(uint16_t)u; break;
        case SAE__TORCH_I8: v = (int8_t)(uint8_t)u; break;
        case SAE__TORCH_BOOL: v = u != 0; break;
        default: v = (int64_t)u; break;
        }
        dst[i] = (float)v;
    }
}

/* ---- the whitelist ----------------------------------------------------------------------- */

enum {
    G_ORDERED_DICT = 0,
    G_REBUILD_TENSOR_V2,
    G_REBUILD_PARAMETER,
    G_STORAGE /* G_STORAGE + dtype: torch.FloatStorage, ... */
};

static const struct {
    const char *module, *name;
    int id;
} globals[] = {
    {"collections", "OrderedDict", G_ORDERED_DICT},
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR_V2},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAMETER},
    {"torch", "FloatStorage", G_STORAGE + SAE__TORCH_F32},
    {"torch", "HalfStorage", G_STORAGE + SAE__TORCH_F16},
    {"torch", "BFloat16Storage", G_STORAGE + SAE__TORCH_BF16},
    {"torch", "DoubleStorage", G_STORAGE + SAE__TORCH_F64},
    {"torch", "LongStorage", G_STORAGE + SAE__TORCH_I64},
    {"torch", "IntStorage", G_STORAGE + SAE__TORCH_I32},
    {"torch", "ShortStorage", G_STORAGE + SAE__TORCH_I16},
    {"torch", "CharStorage", G_STORAGE + SAE__TORCH_I8},
    {"torch", "ByteStorage", G_STORAGE + SAE__TORCH_U8},
    {"torch", "BoolStorage", G_STORAGE + SAE__TORCH_BOOL},
};

/* ---- values ------------------------------------------------------------------------------ */

typedef enum { V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_BYTES, V_TUPLE, V_LIST, V_DICT,
               V_GLOBAL, V_STORAGE, V_TENSOR } vkind;

/* For messages: "is %s" -> "is an int". */
static const char *const kind_names[] = {"None",     "a bool",   "an int",    "a float",
                                         "a str",    "bytes",    "a tuple",   "a list",
                                         "a dict",   "a global", "a storage", "a tensor"};

typedef struct value value;
struct value {
    vkind kind;
    value *next;           /* every value, for freeing */
    int64_t i;             /* BOOL, INT; GLOBAL: its id; STORAGE: index */
    double f;
    const char *s;         /* STR, BYTES: points into the pickle */
    size_t len;            /* STR, BYTES: bytes; TUPLE, LIST: items; DICT: pairs */
    size_t cap;
    value **items;         /* TUPLE, LIST; DICT: key, value, key, value, ... */
    sae__torch_tensor *t;  /* TENSOR */
};

typedef struct {
    sae__torch_dict *d;
    const unsigned char *start, *p, *end;
    const char *member; /* "<stem>/data.pkl", for messages */
    value **stack;
    size_t sp;
    size_t marks[MAX_MARKS];
    size_t n_marks;
    value **memo;
    size_t memo_cap, memo_count;
    value *values;
    size_t bytes, max_bytes; /* what values take, and the bound the pickle's size sets */
    size_t slots;            /* dict pairs created: bounds the flattening */
    size_t *storage_of;      /* member index -> storage index + 1 (0: none yet) */
    size_t n_members;
    size_t op_at;            /* offset of the current opcode */
    int alloc_rc;            /* why the last vm_alloc returned NULL */
} vm;

static int fmt_err(vm *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int unsup(vm *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int vfail(vm *m, int code, const char *fmt, va_list ap)
{
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    return sae__fail(code, "%s: %s, byte %zu: %s", m->d->path, m->member, m->op_at, msg);
}

static int fmt_err(vm *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = vfail(m, SAE_EFORMAT, fmt, ap);
    va_end(ap);
    return rc;
}

static int unsup(vm *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = vfail(m, SAE_EUNSUPPORTED, fmt, ap);
    va_end(ap);
    return rc;
}

/* Counts bytes against the bound; NULL (message set) past it or when malloc fails. */
static void *vm_alloc(vm *m, size_t n)
{
    if (!sae__add(m->bytes, n, &m->bytes) || m->bytes > m->max_bytes) {
        m->alloc_rc = fmt_err(m, "the pickle builds more than %zu bytes of values, more than "
                                 "its size allows",
                              m->max_bytes);
        return NULL;
    }
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        m->alloc_rc = sae__fail(SAE_ENOMEM, "%s: %s: out of memory", m->d->path, m->member);
    return p;
}

static value *new_value(vm *m, vkind kind)
{
    value *v = vm_alloc(m, sizeof *v);
    if (v == NULL)
        return NULL;
    memset(v, 0, sizeof *v);
    v->kind = kind;
    v->next = m->values;
    m->values = v;
    return v;
}

/* Room for one more item (two for a dict pair) in v->items. */
static int grow(vm *m, value *v, size_t extra)
{
    size_t need;
    if (!sae__add(v->len * (v->kind == V_DICT ? 2 : 1), extra, &need))
        return fmt_err(m, "container too large");
    if (need <= v->cap)
        return SAE_OK;
    size_t cap = v->cap ? v->cap : 8;
    while (cap < need)
        if (!sae__mul(cap, 2, &cap))
            return fmt_err(m, "container too large");
    size_t bytes;
    if (!sae__mul(cap - v->cap, sizeof(value *), &bytes) || !sae__add(m->bytes, bytes, &m->bytes) ||
        m->bytes > m->max_bytes)
        return fmt_err(m, "the pickle builds more than %zu bytes of values, more than its size "
                          "allows",
                       m->max_bytes);
    value **items = realloc(v->items, cap * sizeof(value *));
    if (items == NULL)
        return sae__fail(SAE_ENOMEM, "%s: %s: out of memory", m->d->path, m->member);
    v->items = items;
    v->cap = cap;
    return SAE_OK;
}

static void free_values(vm *m)
{
    for (value *v = m->values, *next; v != NULL; v = next) {
        next = v->next;
        free(v->items);
        free(v->t);
        free(v);
    }
    m->values = NULL;
}

/* ---- the stack --------------------------------------------------------------------------- */

static size_t floor_of(const vm *m) { return m->n_marks ? m->marks[m->n_marks - 1] : 0; }

static int push(vm *m, value *v)
{
    if (v == NULL)
        return m->alloc_rc; /* the message is set */
    if (m->sp >= MAX_STACK)
        return unsup(m, "the pickle's stack grows past %zu entries", MAX_STACK);
    m->stack[m->sp++] = v;
    return SAE_OK;
}

static int pop(vm *m, value **out)
{
    if (m->sp <= floor_of(m))
        return fmt_err(m, "stack underflow");
    *out = m->stack[--m->sp];
    return SAE_OK;
}

static int top(vm *m, value **out)
{
    if (m->sp <= floor_of(m))
        return fmt_err(m, "stack underflow");
    *out = m->stack[m->sp - 1];
    return SAE_OK;
}

/* The entries since the last MARK: items = stack + *first, count = sp - *first; the mark is
 * popped (the caller then drops the items by setting sp). */
static int pop_mark(vm *m, size_t *first)
{
    if (m->n_marks == 0)
        return fmt_err(m, "no MARK on the stack");
    *first = m->marks[--m->n_marks];
    return SAE_OK;
}

/* ---- reading the pickle ------------------------------------------------------------------ */

static int need(vm *m, size_t n, const unsigned char **at)
{
    if ((size_t)(m->end - m->p) < n)
        return fmt_err(m, "the pickle ends inside an opcode's argument (truncated)");
    *at = m->p;
    m->p += n;
    return SAE_OK;
}

static uint64_t le(const unsigned char *b, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v |= (uint64_t)b[i] << (8 * i);
    return v;
}

/* A length-prefixed string or bytes (nlen bytes of little-endian length). */
static int read_str(vm *m, size_t nlen, vkind kind)
{
    const unsigned char *b = NULL;
    int rc = need(m, nlen, &b);
    if (rc != SAE_OK)
        return rc;
    uint64_t len = le(b, nlen);
    if (nlen == 4 && kind == V_STR && m->start[m->op_at] == 'T' && (len & 0x80000000u))
        return fmt_err(m, "BINSTRING with a negative length");
    if (len > (uint64_t)(m->end - m->p))
        return fmt_err(m, "a string of %" PRIu64 " bytes runs past the end of the pickle", len);
    value *v = new_value(m, kind);
    if (v != NULL) {
        v->s = (const char *)m->p;
        v->len = (size_t)len;
        m->p += len;
    }
    return push(m, v);
}

static int push_int(vm *m, int64_t i, vkind kind)
{
    value *v = new_value(m, kind);
    if (v != NULL)
        v->i = i;
    return push(m, v);
}

/* A little-endian two's-complement integer of n bytes (LONG1, LONG4). */
static int read_long(vm *m, size_t nlen)
{
    const unsigned char *b = NULL;
    int rc = need(m, nlen, &b);
    if (rc != SAE_OK)
        return rc;
    uint64_t n = le(b, nlen);
    if (n > 8)
        return unsup(m, "an integer of %" PRIu64 " bytes (more than 64 bits)", n);
    if ((rc = need(m, (size_t)n, &b)) != SAE_OK)
        return rc;
    uint64_t u = le(b, (size_t)n);
    if (n > 0 && n < 8 && (b[n - 1] & 0x80))
        u |= ~(uint64_t)0 << (8 * n); /* sign-extend */
    return push_int(m, (int64_t)u, V_INT);
}

static int str_eq(const value *v, const char *s)
{
    return v->kind == V_STR && v->len == strlen(s) && memcmp(v->s, s, v->len) == 0;
}

/* GLOBAL / STACK_GLOBAL: a whitelisted name becomes an inert V_GLOBAL; anything else fails. */
static int push_global(vm *m, const char *module, size_t mlen, const char *name, size_t nlen)
{
    for (size_t g = 0; g < sizeof globals / sizeof globals[0]; g++)
        if (strlen(globals[g].module) == mlen && memcmp(globals[g].module, module, mlen) == 0 &&
            strlen(globals[g].name) == nlen && memcmp(globals[g].name, name, nlen) == 0)
            return push_int(m, globals[g].id, V_GLOBAL);
    /* Printable for the message: control bytes become '?'. */
    char shown[2 * MAX_GLOBAL + 2];
    size_t k = 0;
    for (size_t i = 0; i < mlen && i < MAX_GLOBAL; i++)
        shown[k++] = module[i] >= 0x20 && module[i] < 0x7f ? module[i] : '?';
    shown[k++] = '.';
    for (size_t i = 0; i < nlen && i < MAX_GLOBAL; i++)
        shown[k++] = name[i] >= 0x20 && name[i] < 0x7f ? name[i] : '?';
    shown[k] = '\0';
    return unsup(m,
                 "global '%s' is not allowed (only collections.OrderedDict, "
                 "torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter and the "
                 "torch.*Storage classes); nothing was run",
                 shown);
}

static int read_line(vm *m, const char **s, size_t *len)
{
    const unsigned char *nl = memchr(m->p, '\n', (size_t)(m->end - m->p));
    if (nl == NULL)
        return fmt_err(m, "GLOBAL without its newline (truncated)");
    *s = (const char *)m->p;
    *len = (size_t)(nl - m->p);
    m->p = nl + 1;
    return SAE_OK;
}

/* ---- persistent ids: storages ------------------------------------------------------------ */

static int member_stat(sae__torch_dict *d, zip_uint64_t index, const char *member,
                       zip_uint64_t *size)
{
    return sae__zip_member_stat(d->za, index, member, d->path, d->file_size, size);
}

/* BINPERSID: ('storage', torch.XStorage, key, location, numel) -> a V_STORAGE. */
static int persistent_load(vm *m, value *pid)
{
    sae__torch_dict *d = m->d;
    if (pid->kind != V_TUPLE || pid->len != 5 || !str_eq(pid->items[0], "storage"))
        return unsup(m, "a persistent id that is not ('storage', type, key, location, numel)");
    value *type = pid->items[1], *key = pid->items[2], *loc = pid->items[3],
          *numel = pid->items[4];
    if (type->kind != V_GLOBAL || type->i < G_STORAGE)
        return unsup(m, "a persistent id whose storage type is %s, not a torch.*Storage class",
                     type->kind == V_GLOBAL ? "a callable" : kind_names[type->kind]);
    if (key->kind != V_STR || key->len == 0 || key->len > MAX_KEY)
        return fmt_err(m, "a storage key that is not a short string");
    for (size_t i = 0; i < key->len; i++) {
        char c = key->s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              c == '_'))
            return fmt_err(m, "storage key '%.*s' holds a character other than [0-9A-Za-z_]",
                           (int)key->len, key->s);
    }
    if (loc->kind != V_STR)
        return fmt_err(m, "storage location is %s, not a string", kind_names[loc->kind]);
    if (numel->kind != V_INT || numel->i < 0)
        return fmt_err(m, "storage numel is not a whole number");
    sae__torch_dtype dt = (sae__torch_dtype)(type->i - G_STORAGE);
    size_t es = sae__torch_dtype_size(dt), nbytes;
    if ((uint64_t)numel->i > SIZE_MAX || !sae__mul((size_t)numel->i, es, &nbytes))
        return fmt_err(m, "storage '%.*s' of %" PRId64 " elements overflows", (int)key->len,
                       key->s, numel->i);
    char member[MAX_NAME + MAX_KEY + 16];
    snprintf(member, sizeof member, "%s/data/%.*s", d->stem, (int)key->len, key->s);
    zip_int64_t index = zip_name_locate(d->za, member, ZIP_FL_ENC_RAW);
    if (index < 0 || (zip_uint64_t)index >= m->n_members)
        return sae__fail(SAE_EFORMAT, "%s: storage '%.*s' (member '%s') is missing", d->path,
                         (int)key->len, key->s, member);
    size_t si = m->storage_of[index];
    if (si == 0) {
        zip_uint64_t size;
        int rc = member_stat(d, (zip_uint64_t)index, member, &size);
        if (rc != SAE_OK)
            return rc;
        if (size != nbytes)
            return sae__fail(SAE_EFORMAT,
                             "%s: member '%s' holds %llu bytes, but its storage is %" PRId64
                             " %s elements (%zu bytes)",
                             d->path, member, (unsigned long long)size, numel->i,
                             sae__torch_dtype_name(dt), nbytes);
        /* Storages are at most one per member: n_members bounds the array. */
        if (d->storages == NULL &&
            (d->storages = calloc(m->n_members, sizeof *d->storages)) == NULL)
            return sae__fail(SAE_ENOMEM, "%s: out of memory", d->path);
        sae__torch_storage *s = &d->storages[d->n_storages];
        if ((s->member = strdup(member)) == NULL)
            return sae__fail(SAE_ENOMEM, "%s: out of memory", d->path);
        s->dtype = dt;
        s->numel = (size_t)numel->i;
        s->nbytes = nbytes;
        s->index = (uint64_t)index;
        si = ++d->n_storages;
        m->storage_of[index] = si;
    } else {
        const sae__torch_storage *s = &d->storages[si - 1];
        if (s->dtype != dt || s->numel != (size_t)numel->i)
            return fmt_err(m,
                           "storage '%.*s' is referenced as %" PRId64 " %s elements and as %zu "
                           "%s elements",
                           (int)key->len, key->s, numel->i, sae__torch_dtype_name(dt), s->numel,
                           sae__torch_dtype_name(s->dtype));
    }
    value *v = new_value(m, V_STORAGE);
    if (v != NULL)
        v->i = (int64_t)(si - 1);
    return push(m, v);
}

/* ---- REDUCE: the whitelisted callables, none of which is called -------------------------- */

static int int_tuple(vm *m, const value *v, const char *what, size_t out[4], size_t *n)
{
    if (v->kind != V_TUPLE)
        return fmt_err(m, "tensor %s is %s, not a tuple", what, kind_names[v->kind]);
    if (v->len > 4)
        return unsup(m, "a tensor of %zu dimensions (at most 4)", v->len);
    for (size_t i = 0; i < v->len; i++) {
        const value *e = v->items[i];
        if (e->kind != V_INT)
            return fmt_err(m, "tensor %s[%zu] is %s, not an int", what, i, kind_names[e->kind]);
        if (e->i < 0)
            return fmt_err(m, "tensor %s[%zu] is negative (%" PRId64 ")", what, i, e->i);
        if ((uint64_t)e->i > SIZE_MAX)
            return fmt_err(m, "tensor %s[%zu] is too large", what, i);
        out[i] = (size_t)e->i;
    }
    *n = v->len;
    return SAE_OK;
}

static int rebuild_tensor(vm *m, const value *args)
{
    if (args->len != 6 && args->len != 7)
        return fmt_err(m, "_rebuild_tensor_v2 with %zu arguments (6 or 7)", args->len);
    value *const *a = args->items;
    if (a[0]->kind != V_STORAGE)
        return fmt_err(m, "_rebuild_tensor_v2 on %s, not a storage", kind_names[a[0]->kind]);
    if (a[1]->kind != V_INT || a[1]->i < 0 || (uint64_t)a[1]->i > SIZE_MAX)
        return fmt_err(m, "tensor storage offset is not a whole number");
    if (a[4]->kind != V_BOOL)
        return fmt_err(m, "tensor requires_grad is %s, not a bool", kind_names[a[4]->kind]);
    if (a[5]->kind != V_DICT)
        return fmt_err(m, "tensor backward_hooks is %s, not a dict", kind_names[a[5]->kind]);
    if (args->len == 7 && a[6]->kind != V_NONE && !(a[6]->kind == V_DICT && a[6]->len == 0))
        return unsup(m, "tensor metadata (a conjugate or negative bit, or a subclass's "
                        "state) is not supported");
    sae__torch_tensor t;
    memset(&t, 0, sizeof t);
    const sae__torch_storage *s = &m->d->storages[a[0]->i];
    t.storage = (size_t)a[0]->i;
    t.dtype = s->dtype;
    t.offset = (size_t)a[1]->i;
    size_t nstride;
    int rc = int_tuple(m, a[2], "size", t.shape, &t.ndim);
    if (rc == SAE_OK)
        rc = int_tuple(m, a[3], "stride", t.stride, &nstride);
    if (rc != SAE_OK)
        return rc;
    if (nstride != t.ndim)
        return fmt_err(m, "tensor size has %zu dimensions but stride %zu", t.ndim, nstride);
    t.count = 1;
    for (size_t i = 0; i < t.ndim; i++)
        if (!sae__mul(t.count, t.shape[i], &t.count))
            return fmt_err(m, "tensor size overflows");
    /* The last element addressed: offset + sum (shape[i] - 1) * stride[i] < numel. */
    size_t last = t.offset;
    if (t.count > 0) {
        for (size_t i = 0; i < t.ndim; i++) {
            size_t step;
            if (!sae__mul(t.shape[i] - 1, t.stride[i], &step) || !sae__add(last, step, &last))
                return fmt_err(m, "tensor size x stride overflows");
        }
        if (last >= s->numel)
            return fmt_err(m,
                           "tensor reaches element %zu of storage '%s', which has %zu "
                           "(storage offset %zu)",
                           last, s->member, s->numel, t.offset);
    } else if (t.offset > s->numel) {
        return fmt_err(m, "storage offset %zu past storage '%s' of %zu elements", t.offset,
                       s->member, s->numel);
    }
    size_t expect = 1;
    t.contiguous = true;
    for (size_t i = t.ndim; i-- > 0;) {
        if (t.shape[i] != 1 && t.stride[i] != expect)
            t.contiguous = false;
        expect *= t.shape[i]; /* cannot overflow: count did not */
    }
    value *v = new_value(m, V_TENSOR);
    if (v == NULL)
        return m->alloc_rc;
    if ((v->t = malloc(sizeof t)) == NULL)
        return sae__fail(SAE_ENOMEM, "%s: out of memory", m->d->path);
    *v->t = t;
    return push(m, v);
}

static int reduce(vm *m)
{
    value *args = NULL, *fn = NULL;
    int rc = pop(m, &args);
    if (rc == SAE_OK)
        rc = pop(m, &fn);
    if (rc != SAE_OK)
        return rc;
    if (fn->kind != V_GLOBAL)
        return unsup(m, "REDUCE of %s (only whitelisted globals can be rebuilt)",
                     kind_names[fn->kind]);
    if (args->kind != V_TUPLE)
        return fmt_err(m, "REDUCE arguments are %s, not a tuple", kind_names[args->kind]);
    switch (fn->i) {
    case G_ORDERED_DICT:
        if (args->len != 0)
            return unsup(m, "collections.OrderedDict with arguments");
        return push(m, new_value(m, V_DICT));
    case G_REBUILD_TENSOR_V2:
        return rebuild_tensor(m, args);
    case G_REBUILD_PARAMETER:
        if (args->len != 3 || args->items[0]->kind != V_TENSOR)
            return fmt_err(m, "_rebuild_parameter not of (tensor, requires_grad, hooks)");
        return push(m, args->items[0]);
    default:
        return unsup(m, "REDUCE of a storage class (a storage saved without a tensor)");
    }
}

/* ---- the machine ------------------------------------------------------------------------- */

static const char *const op_names[256] = {
    ['('] = "MARK", ['.'] = "STOP", ['0'] = "POP", ['1'] = "POP_MARK", ['2'] = "DUP",
    ['F'] = "FLOAT", ['I'] = "INT", ['J'] = "BININT", ['K'] = "BININT1", ['L'] = "LONG",
    ['M'] = "BININT2", ['N'] = "NONE", ['P'] = "PERSID", ['Q'] = "BINPERSID", ['R'] = "REDUCE",
    ['S'] = "STRING", ['T'] = "BINSTRING", ['U'] = "SHORT_BINSTRING", ['V'] = "UNICODE",
    ['X'] = "BINUNICODE", ['a'] = "APPEND", ['b'] = "BUILD", ['c'] = "GLOBAL", ['d'] = "DICT",
    ['}'] = "EMPTY_DICT", ['e'] = "APPENDS", ['g'] = "GET", ['h'] = "BINGET", ['i'] = "INST",
    ['j'] = "LONG_BINGET", ['l'] = "LIST", [']'] = "EMPTY_LIST", ['o'] = "OBJ", ['p'] = "PUT",
    ['q'] = "BINPUT", ['r'] = "LONG_BINPUT", ['s'] = "SETITEM", ['t'] = "TUPLE",
    [')'] = "EMPTY_TUPLE", ['u'] = "SETITEMS", ['G'] = "BINFLOAT", [0x80] = "PROTO",
    [0x81] = "NEWOBJ", [0x82] = "EXT1", [0x83] = "EXT2", [0x84] = "EXT4", [0x85] = "TUPLE1",
    [0x86] = "TUPLE2", [0x87] = "TUPLE3", [0x88] = "NEWTRUE", [0x89] = "NEWFALSE",
    [0x8a] = "LONG1", [0x8b] = "LONG4", ['B'] = "BINBYTES", ['C'] = "SHORT_BINBYTES",
    [0x8c] = "SHORT_BINUNICODE", [0x8d] = "BINUNICODE8", [0x8e] = "BINBYTES8",
    [0x8f] = "EMPTY_SET", [0x90] = "ADDITEMS", [0x91] = "FROZENSET", [0x92] = "NEWOBJ_EX",
    [0x93] = "STACK_GLOBAL", [0x94] = "MEMOIZE", [0x95] = "FRAME", [0x96] = "BYTEARRAY8",
    [0x97] = "NEXT_BUFFER", [0x98] = "READONLY_BUFFER",
};

static int memo_put(vm *m, uint64_t index)
{
    value *v = NULL;
    int rc = top(m, &v);
    if (rc != SAE_OK)
        return rc;
    /* A pickle sets each index with an opcode of at least two bytes: larger indices are lies. */
    if (index >= MAX_MEMO || index > (uint64_t)(m->end - m->start))
        return unsup(m, "memo index %" PRIu64 " beyond what the pickle's size allows", index);
    if (index >= m->memo_cap) {
        size_t cap = m->memo_cap ? m->memo_cap : 64;
        while (cap <= index)
            cap *= 2;
        size_t bytes = (cap - m->memo_cap) * sizeof(value *);
        if (!sae__add(m->bytes, bytes, &m->bytes) || m->bytes > m->max_bytes)
            return fmt_err(m, "the memo grows past what the pickle's size allows");
        value **memo = realloc(m->memo, cap * sizeof(value *));
        if (memo == NULL)
            return sae__fail(SAE_ENOMEM, "%s: out of memory", m->d->path);
        memset(memo + m->memo_cap, 0, (cap - m->memo_cap) * sizeof(value *));
        m->memo = memo;
        m->memo_cap = cap;
    }
    if (m->memo[index] == NULL)
        m->memo_count++;
    m->memo[index] = v;
    return SAE_OK;
}

static int memo_get(vm *m, uint64_t index)
{
    if (index >= m->memo_cap || m->memo[index] == NULL)
        return fmt_err(m, "memo index %" PRIu64 " was never set", index);
    return push(m, m->memo[index]);
}

static int make_seq(vm *m, vkind kind, size_t first)
{
    size_t n = m->sp - first;
    value *v = new_value(m, kind);
    if (v == NULL)
        return m->alloc_rc;
    if (n > 0) {
        int rc = grow(m, v, n);
        if (rc != SAE_OK)
            return rc;
        memcpy(v->items, m->stack + first, n * sizeof(value *));
        v->len = n;
    }
    m->sp = first;
    return push(m, v);
}

static int set_items(vm *m, value *dict, size_t first)
{
    size_t n = m->sp - first;
    if (dict->kind != V_DICT)
        return unsup(m, "SETITEM(S) on %s", kind_names[dict->kind]);
    if (n % 2)
        return fmt_err(m, "SETITEMS with an odd number of entries");
    int rc = grow(m, dict, n);
    if (rc != SAE_OK)
        return rc;
    if (n > 0) /* an empty SETITEMS may find items NULL */
        memcpy(dict->items + 2 * dict->len, m->stack + first, n * sizeof(value *));
    dict->len += n / 2;
    if (!sae__add(m->slots, n / 2, &m->slots))
        return fmt_err(m, "too many entries");
    m->sp = first;
    return SAE_OK;
}

static int append_items(vm *m, value *list, size_t first)
{
    size_t n = m->sp - first;
    if (list->kind != V_LIST)
        return unsup(m, "APPEND(S) on %s", kind_names[list->kind]);
    int rc = grow(m, list, n);
    if (rc != SAE_OK)
        return rc;
    if (n > 0)
        memcpy(list->items + list->len, m->stack + first, n * sizeof(value *));
    list->len += n;
    m->sp = first;
    return SAE_OK;
}

static int step(vm *m, value **result)
{
    const unsigned char *b = NULL;
    m->op_at = (size_t)(m->p - m->start);
    if (m->p >= m->end)
        return fmt_err(m, "the pickle ends without STOP (truncated)");
    unsigned op = *m->p++;
    value *v = NULL, *w = NULL;
    size_t first = 0;
    int rc;
    switch (op) {
    case 0x80: /* PROTO */
        if ((rc = need(m, 1, &b)) != SAE_OK)
            return rc;
        if (b[0] < 2 || b[0] > 5)
            return unsup(m, "pickle protocol %d (torch.save writes 2 to 5)", b[0]);
        return SAE_OK;
    case 0x95: /* FRAME: a length hint; the frame's bytes follow as ordinary opcodes */
        if ((rc = need(m, 8, &b)) != SAE_OK)
            return rc;
        if (le(b, 8) > (uint64_t)(m->end - m->p))
            return fmt_err(m, "a frame of %" PRIu64 " bytes runs past the end of the pickle",
                           le(b, 8));
        return SAE_OK;
    case '.': /* STOP */
        if ((rc = pop(m, result)) != SAE_OK)
            return rc;
        return SAE_OK;
    case '(': /* MARK */
        if (m->n_marks >= MAX_MARKS)
            return unsup(m, "MARKs nested deeper than %u", MAX_MARKS);
        m->marks[m->n_marks++] = m->sp;
        return SAE_OK;
    case '0': /* POP */
        if (m->sp > floor_of(m))
            return pop(m, &v);
        return pop_mark(m, &first);
    case '1': /* POP_MARK */
        if ((rc = pop_mark(m, &first)) == SAE_OK)
            m->sp = first;
        return rc;
    case '2': /* DUP */
        if ((rc = top(m, &v)) != SAE_OK)
            return rc;
        return push(m, v);
    case 'N': return push(m, new_value(m, V_NONE));
    case 0x88: return push_int(m, 1, V_BOOL);
    case 0x89: return push_int(m, 0, V_BOOL);
    case 'J':
        if ((rc = need(m, 4, &b)) != SAE_OK)
            return rc;
        return push_int(m, (int32_t)(uint32_t)le(b, 4), V_INT);
    case 'K':
        if ((rc = need(m, 1, &b)) != SAE_OK)
            return rc;
        return push_int(m, b[0], V_INT);
    case 'M':
        if ((rc = need(m, 2, &b)) != SAE_OK)
            return rc;
        return push_int(m, (int64_t)le(b, 2), V_INT);
    case 0x8a: return read_long(m, 1);
    case 0x8b: return read_long(m, 4);
    case 'G': { /* BINFLOAT: big-endian IEEE double */
        if ((rc = need(m, 8, &b)) != SAE_OK)
            return rc;
        uint64_t u = 0;
        for (size_t i = 0; i < 8; i++)
            u = u << 8 | b[i];
        double f;
        memcpy(&f, &u, sizeof f);
        if ((v = new_value(m, V_FLOAT)) != NULL)
            v->f = f;
        return push(m, v);
    }
    case 'X': return read_str(m, 4, V_STR);
    case 0x8c: return read_str(m, 1, V_STR);
    case 0x8d: return read_str(m, 8, V_STR);
    case 'T': return read_str(m, 4, V_STR); /* str in Python 3 (encoding='ASCII') */
    case 'U': return read_str(m, 1, V_STR);
    case 'B': return read_str(m, 4, V_BYTES);
    case 'C': return read_str(m, 1, V_BYTES);
    case 0x8e: return read_str(m, 8, V_BYTES);
    case ')': return push(m, new_value(m, V_TUPLE));
    case ']': return push(m, new_value(m, V_LIST));
    case '}': return push(m, new_value(m, V_DICT));
    case 0x85: case 0x86: case 0x87: { /* TUPLE1-3 */
        size_t n = op - 0x84u;
        if (m->sp < floor_of(m) + n)
            return fmt_err(m, "stack underflow");
        return make_seq(m, V_TUPLE, m->sp - n);
    }
    case 't': case 'l': case 'd': /* TUPLE, LIST, DICT from the items since MARK */
        if ((rc = pop_mark(m, &first)) != SAE_OK)
            return rc;
        if (op != 'd')
            return make_seq(m, op == 't' ? V_TUPLE : V_LIST, first);
        if ((v = new_value(m, V_DICT)) == NULL)
            return m->alloc_rc;
        if ((rc = set_items(m, v, first)) != SAE_OK)
            return rc;
        return push(m, v);
    case 's': /* SETITEM */
        if (m->sp < floor_of(m) + 3)
            return fmt_err(m, "stack underflow");
        return set_items(m, m->stack[m->sp - 3], m->sp - 2);
    case 'u': /* SETITEMS */
        if ((rc = pop_mark(m, &first)) != SAE_OK)
            return rc;
        if (first <= floor_of(m))
            return fmt_err(m, "SETITEMS without a dict");
        return set_items(m, m->stack[first - 1], first);
    case 'a': /* APPEND */
        if (m->sp < floor_of(m) + 2)
            return fmt_err(m, "stack underflow");
        return append_items(m, m->stack[m->sp - 2], m->sp - 1);
    case 'e': /* APPENDS */
        if ((rc = pop_mark(m, &first)) != SAE_OK)
            return rc;
        if (first <= floor_of(m))
            return fmt_err(m, "APPENDS without a list");
        return append_items(m, m->stack[first - 1], first);
    case 'c': { /* GLOBAL module\nname\n */
        const char *mod = NULL, *name = NULL;
        size_t ml = 0, nl = 0;
        if ((rc = read_line(m, &mod, &ml)) != SAE_OK || (rc = read_line(m, &name, &nl)) != SAE_OK)
            return rc;
        return push_global(m, mod, ml, name, nl);
    }
    case 0x93: /* STACK_GLOBAL */
        if ((rc = pop(m, &w)) != SAE_OK || (rc = pop(m, &v)) != SAE_OK)
            return rc;
        if (v->kind != V_STR || w->kind != V_STR)
            return fmt_err(m, "STACK_GLOBAL of %s and %s, not two strings",
                           kind_names[v->kind], kind_names[w->kind]);
        return push_global(m, v->s, v->len, w->s, w->len);
    case 'R': return reduce(m);
    case 'b': /* BUILD: only the attributes torch's OrderedDict carries (_metadata) */
        if ((rc = pop(m, &w)) != SAE_OK || (rc = top(m, &v)) != SAE_OK)
            return rc;
        if (v->kind != V_DICT || (w->kind != V_DICT && w->kind != V_NONE))
            return unsup(m, "BUILD of %s with %s (only a dict's attributes are accepted)",
                         kind_names[v->kind], kind_names[w->kind]);
        return SAE_OK; /* the attributes are not entries: ignored */
    case 'Q': /* BINPERSID */
        if ((rc = pop(m, &v)) != SAE_OK)
            return rc;
        return persistent_load(m, v);
    case 'q':
        if ((rc = need(m, 1, &b)) != SAE_OK)
            return rc;
        return memo_put(m, b[0]);
    case 'r':
        if ((rc = need(m, 4, &b)) != SAE_OK)
            return rc;
        return memo_put(m, le(b, 4));
    case 0x94: return memo_put(m, m->memo_count);
    case 'h':
        if ((rc = need(m, 1, &b)) != SAE_OK)
            return rc;
        return memo_get(m, b[0]);
    case 'j':
        if ((rc = need(m, 4, &b)) != SAE_OK)
            return rc;
        return memo_get(m, le(b, 4));
    default:
        if (op_names[op] != NULL)
            return unsup(m, "pickle opcode %s (0x%02x) is not allowed in a state dict",
                         op_names[op], op);
        return fmt_err(m, "unknown pickle opcode 0x%02x", op);
    }
}

/* ---- flattening the result into entries -------------------------------------------------- */

typedef struct {
    const char *name;
    const sae__torch_tensor *t;
    const sae__torch_scalar *s;
} entry;

typedef struct {
    vm *m;
    sae__torch_tensor *tensors;
    size_t n_tensors, cap_tensors;
    sae__torch_scalar *scalars;
    size_t n_scalars, cap_scalars;
    size_t visits; /* dict pairs visited: at most the pairs the pickle made */
} flat;

static int add_name(flat *f, char **out, const char *name)
{
    if ((*out = strdup(name)) == NULL)
        return sae__fail(SAE_ENOMEM, "%s: out of memory", f->m->d->path);
    return SAE_OK;
}

static int flatten(flat *f, const value *dict, const char *prefix, size_t depth)
{
    sae__torch_dict *d = f->m->d;
    if (depth > SAE__TORCH_MAX_DEPTH)
        return sae__fail(SAE_EUNSUPPORTED, "%s: dicts nested deeper than %d levels (at '%s')",
                         d->path, SAE__TORCH_MAX_DEPTH, prefix);
    for (size_t i = 0; i < dict->len; i++) {
        if (++f->visits > f->m->slots)
            return sae__fail(SAE_EFORMAT,
                             "%s: the dicts nest into more entries than the pickle holds (a "
                             "dict shared many times)",
                             d->path);
        const value *k = dict->items[2 * i], *v = dict->items[2 * i + 1];
        char key[32];
        const char *ks;
        size_t kl;
        if (k->kind == V_STR) {
            ks = k->s;
            kl = k->len;
            if (memchr(ks, '\0', kl) != NULL)
                return sae__fail(SAE_EFORMAT, "%s: a key holds a NUL byte", d->path);
        } else if (k->kind == V_INT) {
            kl = (size_t)snprintf(key, sizeof key, "%" PRId64, k->i);
            ks = key;
        } else {
            continue; /* a key libsae cannot name */
        }
        size_t pl = strlen(prefix);
        if (pl + 1 + kl >= MAX_NAME)
            return sae__fail(SAE_EUNSUPPORTED, "%s: an entry name longer than %u bytes", d->path,
                             MAX_NAME);
        char name[MAX_NAME]; /* prefix.key, whose length was checked above */
        size_t at = 0;
        if (pl) {
            memcpy(name, prefix, pl);
            name[pl] = '.';
            at = pl + 1;
        }
        memcpy(name + at, ks, kl);
        name[at + kl] = '\0';
        int rc = SAE_OK;
        if (v->kind == V_DICT) {
            rc = flatten(f, v, name, depth + 1);
        } else if (v->kind == V_TENSOR) {
            if (f->n_tensors == f->cap_tensors) {
                size_t cap = f->cap_tensors ? 2 * f->cap_tensors : 16;
                sae__torch_tensor *t = realloc(f->tensors, cap * sizeof *t);
                if (t == NULL)
                    return sae__fail(SAE_ENOMEM, "%s: out of memory", d->path);
                f->tensors = t;
                f->cap_tensors = cap;
            }
            sae__torch_tensor *t = &f->tensors[f->n_tensors];
            *t = *v->t;
            if ((rc = add_name(f, (char **)&t->name, name)) == SAE_OK)
                f->n_tensors++;
        } else if (v->kind == V_INT || v->kind == V_FLOAT || v->kind == V_BOOL ||
                   v->kind == V_STR) {
            if (f->n_scalars == f->cap_scalars) {
                size_t cap = f->cap_scalars ? 2 * f->cap_scalars : 16;
                sae__torch_scalar *s = realloc(f->scalars, cap * sizeof *s);
                if (s == NULL)
                    return sae__fail(SAE_ENOMEM, "%s: out of memory", d->path);
                f->scalars = s;
                f->cap_scalars = cap;
            }
            sae__torch_scalar *s = &f->scalars[f->n_scalars];
            memset(s, 0, sizeof *s);
            if (v->kind == V_STR) {
                char *copy = malloc(v->len + 1);
                if (copy == NULL)
                    return sae__fail(SAE_ENOMEM, "%s: out of memory", d->path);
                memcpy(copy, v->s, v->len);
                copy[v->len] = '\0';
                s->kind = SAE__TORCH_STR;
                s->s = copy;
                s->s_len = v->len;
            } else {
                s->kind = v->kind == V_INT    ? SAE__TORCH_INT
                          : v->kind == V_BOOL ? SAE__TORCH_BOOLEAN
                                              : SAE__TORCH_FLOAT;
                s->i = v->kind == V_FLOAT ? 0 : v->i;
                s->f = v->kind == V_FLOAT ? v->f : (double)v->i;
            }
            if ((rc = add_name(f, (char **)&s->name, name)) == SAE_OK)
                f->n_scalars++;
            else
                free((char *)s->s);
        } /* None, lists, tuples, bytes: skipped */
        if (rc != SAE_OK)
            return rc;
    }
    return SAE_OK;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const entry *)a)->name, ((const entry *)b)->name);
}

/* ---- the archive ------------------------------------------------------------------------- */

/* Reads a whole member of at most max bytes into a malloc'd buffer. */
static int read_member(sae__torch_dict *d, zip_uint64_t index, const char *member, size_t max,
                       unsigned char **out, size_t *size)
{
    zip_uint64_t zsize;
    int rc = member_stat(d, index, member, &zsize);
    if (rc != SAE_OK)
        return rc;
    if (zsize > max)
        return sae__fail(SAE_EUNSUPPORTED, "%s: member '%s' has %llu bytes (at most %zu)",
                         d->path, member, (unsigned long long)zsize, max);
    unsigned char *buf = malloc((size_t)zsize + 1);
    if (buf == NULL)
        return sae__fail(SAE_ENOMEM, "%s: out of memory reading '%s'", d->path, member);
    zip_file_t *zf = zip_fopen_index(d->za, index, 0);
    if (zf == NULL) {
        free(buf);
        return sae__fail(SAE_EFORMAT, "%s: cannot read member '%s': %s", d->path, member,
                         zip_strerror(d->za));
    }
    size_t got = 0;
    while (rc == SAE_OK) {
        zip_int64_t n = zip_fread(zf, buf + got, (zip_uint64_t)zsize + 1 - got);
        if (n < 0)
            rc = sae__fail(SAE_EFORMAT, "%s: member '%s': %s", d->path, member,
                           zip_file_strerror(zf));
        else if (n == 0)
            break;
        else if ((got += (size_t)n) > zsize)
            rc = sae__fail(SAE_EFORMAT, "%s: member '%s' holds more than its recorded size",
                           d->path, member);
    }
    zip_fclose(zf);
    if (rc == SAE_OK && got != zsize)
        rc = sae__fail(SAE_EFORMAT, "%s: member '%s' ends early (truncated)", d->path, member);
    if (rc != SAE_OK) {
        free(buf);
        return rc;
    }
    *out = buf;
    *size = got;
    return SAE_OK;
}

/* <stem> as torch finds it: the first member's name up to its first '/'. */
static int find_stem(sae__torch_dict *d)
{
    if (zip_get_num_entries(d->za, 0) <= 0)
        return sae__fail(SAE_EFORMAT, "%s: an empty zip archive, not a torch file", d->path);
    const char *first = zip_get_name(d->za, 0, ZIP_FL_ENC_RAW);
    const char *slash = first ? strchr(first, '/') : NULL;
    if (slash == NULL || slash == first || (size_t)(slash - first) >= MAX_NAME)
        return sae__fail(SAE_EFORMAT,
                         "%s: a zip archive whose first member is not in a folder: not a "
                         "torch.save file",
                         d->path);
    if ((d->stem = strndup(first, (size_t)(slash - first))) == NULL)
        return sae__fail(SAE_ENOMEM, "%s: out of memory", d->path);
    return SAE_OK;
}

static int check_byteorder(sae__torch_dict *d)
{
    char member[MAX_NAME + 16];
    snprintf(member, sizeof member, "%s/byteorder", d->stem);
    zip_int64_t index = zip_name_locate(d->za, member, ZIP_FL_ENC_RAW);
    if (index < 0)
        return SAE_OK; /* before torch 2.1: always little-endian in practice */
    unsigned char *buf;
    size_t size;
    int rc = read_member(d, (zip_uint64_t)index, member, 16, &buf, &size);
    if (rc != SAE_OK)
        return rc;
    if (size == 3 && memcmp(buf, "big", 3) == 0)
        rc = sae__fail(SAE_EUNSUPPORTED, "%s: a big-endian torch file ('%s' says big)", d->path,
                       member);
    else if (!(size == 6 && memcmp(buf, "little", 6) == 0))
        rc = sae__fail(SAE_EFORMAT, "%s: member '%s' is neither 'little' nor 'big'", d->path,
                       member);
    free(buf);
    return rc;
}

static int run_pickle(sae__torch_dict *d, const unsigned char *pkl, size_t size,
                      const char *member)
{
    vm m;
    memset(&m, 0, sizeof m);
    m.d = d;
    m.start = m.p = pkl;
    m.end = pkl + size;
    m.member = member;
    /* Every opcode makes at most one value and adds at most a pointer or two to a container,
     * so a pickle of n bytes needs O(n) memory: 256 bytes per pickle byte plus room for a small
     * pickle's memo and containers. */
    m.max_bytes = size < (SIZE_MAX >> 9) ? size * 256 + (1u << 20) : SIZE_MAX;
    m.n_members = (size_t)zip_get_num_entries(d->za, 0);
    int rc = SAE_OK;
    if ((m.stack = malloc(MAX_STACK * sizeof(value *))) == NULL ||
        (m.storage_of = calloc(m.n_members, sizeof(size_t))) == NULL)
        rc = sae__fail(SAE_ENOMEM, "%s: out of memory", d->path);
    value *result = NULL;
    while (rc == SAE_OK && result == NULL)
        rc = step(&m, &result);
    flat f;
    memset(&f, 0, sizeof f);
    f.m = &m;
    if (rc == SAE_OK && result->kind != V_DICT)
        rc = sae__fail(SAE_EUNSUPPORTED,
                       "%s: the pickle holds %s, not a dict of tensors (a state dict)",
                       d->path, kind_names[result->kind]);
    if (rc == SAE_OK)
        rc = flatten(&f, result, "", 0);
    d->tensors = f.tensors;
    d->n_tensors = f.n_tensors;
    d->scalars = f.scalars;
    d->n_scalars = f.n_scalars;
    free_values(&m);
    free(m.stack);
    free(m.memo);
    free(m.storage_of);
    return rc;
}

static int index_names(sae__torch_dict *d)
{
    size_t n = d->n_tensors + d->n_scalars;
    entry *e = calloc(n ? n : 1, sizeof *e);
    if (e == NULL)
        return sae__fail(SAE_ENOMEM, "%s: out of memory", d->path);
    for (size_t i = 0; i < d->n_tensors; i++)
        e[i] = (entry){d->tensors[i].name, &d->tensors[i], NULL};
    for (size_t i = 0; i < d->n_scalars; i++)
        e[d->n_tensors + i] = (entry){d->scalars[i].name, NULL, &d->scalars[i]};
    qsort(e, n, sizeof *e, by_name);
    d->sorted = (const void **)(void *)e;
    d->n_sorted = n;
    for (size_t i = 1; i < n; i++)
        if (strcmp(e[i - 1].name, e[i].name) == 0)
            return sae__fail(SAE_EFORMAT, "%s: the name '%s' appears twice", d->path, e[i].name);
    return SAE_OK;
}

static int open_archive(sae__torch_dict *d, const unsigned char *data, size_t size)
{
    /* The legacy format (torch < 1.6, or _use_new_zipfile_serialization=False): a pickled magic
     * number 0x1950a86a20f9469cfc6c (PROTO n, LONG1 10 bytes) then more pickles. */
    static const unsigned char magic[] = {0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46,
                                          0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
    if (size >= 2 + sizeof magic && data[0] == 0x80 && memcmp(data + 2, magic, sizeof magic) == 0)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: a pre-1.6 torch file (the legacy format of "
                         "_use_new_zipfile_serialization=False); re-save it with torch >= 1.6",
                         d->path);
    if (size >= 1 && data[0] == 0x80)
        return sae__fail(SAE_EUNSUPPORTED, "%s: a bare pickle, not a torch.save zip archive",
                         d->path);
    zip_error_t ze;
    zip_error_init(&ze);
    zip_source_t *src = zip_source_buffer_create(data, size, 0, &ze);
    if (src == NULL) {
        int rc = sae__fail(SAE_ENOMEM, "%s: %s", d->path, zip_error_strerror(&ze));
        zip_error_fini(&ze);
        return rc;
    }
    /* ZIP_CHECKCONS: the central directory and local headers must agree. */
    d->za = zip_open_from_source(src, ZIP_RDONLY | ZIP_CHECKCONS, &ze);
    if (d->za == NULL) {
        int rc = sae__fail(SAE_EFORMAT, "%s: not a readable zip archive: %s", d->path,
                           zip_error_strerror(&ze));
        zip_source_free(src);
        zip_error_fini(&ze);
        return rc;
    }
    zip_error_fini(&ze);
    return SAE_OK;
}

int sae__torch_open(const unsigned char *data, size_t size, const char *path,
                    sae__torch_dict **out)
{
    *out = NULL;
    sae__torch_dict *d = calloc(1, sizeof *d);
    if (d == NULL)
        return sae__fail(SAE_ENOMEM, "%s: out of memory", path);
    d->path = path;
    d->file_size = size;
    int rc = open_archive(d, data, size);
    if (rc == SAE_OK)
        rc = find_stem(d);
    if (rc == SAE_OK)
        rc = check_byteorder(d);
    char member[MAX_NAME + 16];
    zip_int64_t index = -1;
    if (rc == SAE_OK) {
        snprintf(member, sizeof member, "%s/data.pkl", d->stem);
        if ((index = zip_name_locate(d->za, member, ZIP_FL_ENC_RAW)) < 0)
            rc = sae__fail(SAE_EFORMAT, "%s: member '%s' is missing: not a torch.save file",
                           path, member);
    }
    unsigned char *pkl = NULL;
    size_t pkl_size = 0;
    if (rc == SAE_OK)
        rc = read_member(d, (zip_uint64_t)index, member, MAX_PICKLE, &pkl, &pkl_size);
    if (rc == SAE_OK)
        rc = run_pickle(d, pkl, pkl_size, member);
    free(pkl);
    if (rc == SAE_OK)
        rc = index_names(d);
    if (rc != SAE_OK) {
        sae__torch_close(d);
        return rc;
    }
    *out = d;
    return SAE_OK;
}

void sae__torch_close(sae__torch_dict *d)
{
    if (d == NULL)
        return;
    for (size_t i = 0; i < d->n_tensors; i++)
        free((char *)d->tensors[i].name);
    for (size_t i = 0; i < d->n_scalars; i++) {
        free((char *)d->scalars[i].name);
        free((char *)d->scalars[i].s);
    }
    for (size_t i = 0; i < d->n_storages; i++)
        free(d->storages[i].member);
    free(d->tensors);
    free(d->scalars);
    free(d->storages);
    free(d->sorted);
    free(d->stem);
    if (d->za != NULL)
        zip_discard(d->za);
    free(d);
}

static const entry *find_entry(const sae__torch_dict *d, const char *name)
{
    if (d == NULL || name == NULL || d->n_sorted == 0)
        return NULL;
    entry key = {name, NULL, NULL};
    return bsearch(&key, d->sorted, d->n_sorted, sizeof key, by_name);
}

const sae__torch_tensor *sae__torch_find(const sae__torch_dict *d, const char *name)
{
    const entry *e = find_entry(d, name);
    return e ? e->t : NULL;
}

const sae__torch_scalar *sae__torch_find_scalar(const sae__torch_dict *d, const char *name)
{
    const entry *e = find_entry(d, name);
    return e ? e->s : NULL;
}

/* ---- reading tensors --------------------------------------------------------------------- */

/* Reads exactly n bytes (dst NULL: skips them). */
static int read_exact(const sae__torch_dict *d, zip_file_t *zf, const char *member, void *dst,
                      size_t n)
{
    unsigned char scratch[1 << 14], *p = dst;
    while (n > 0) {
        size_t cap = p ? (size_t)1 << 30 : sizeof scratch;
        size_t want = n < cap ? n : cap;
        zip_int64_t got = zip_fread(zf, p ? p : scratch, want);
        if (got < 0)
            return sae__fail(SAE_EFORMAT, "%s: member '%s': %s", d->path, member,
                             zip_file_strerror(zf));
        if (got == 0)
            return sae__fail(SAE_EFORMAT, "%s: member '%s' ends early (truncated)", d->path,
                             member);
        if (p)
            p += got;
        n -= (size_t)got;
    }
    return SAE_OK;
}

/* Row-major gather of a strided tensor from buf, which holds its storage from element offset. */
static void gather(const sae__torch_tensor *t, const unsigned char *buf, float *dst)
{
    size_t shape[4] = {1, 1, 1, 1}, stride[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < t->ndim; i++) {
        shape[4 - t->ndim + i] = t->shape[i];
        stride[4 - t->ndim + i] = t->stride[i];
    }
    size_t es = sae__torch_dtype_size(t->dtype);
    for (size_t a = 0; a < shape[0]; a++)
        for (size_t b = 0; b < shape[1]; b++)
            for (size_t c = 0; c < shape[2]; c++) {
                size_t base = a * stride[0] + b * stride[1] + c * stride[2];
                if (stride[3] == 1) {
                    convert(t->dtype, buf + base * es, shape[3], dst);
                    dst += shape[3];
                } else {
                    for (size_t e = 0; e < shape[3]; e++)
                        convert(t->dtype, buf + (base + e * stride[3]) * es, 1, dst++);
                }
            }
}

/* A [rows][cols] band of rows r0.. (band holds nr rows) into dst's [cols][rows], in square tiles
 * so that both the reads and the strided writes stay in cache. */
static void scatter_band(const float *band, size_t r0, size_t nr, size_t rows, size_t cols,
                         float *dst)
{
    enum { TILE = 64 };
    for (size_t c0 = 0; c0 < cols; c0 += TILE) {
        const size_t c1 = cols - c0 < TILE ? cols : c0 + TILE;
        for (size_t c = c0; c < c1; c++)
            for (size_t r = 0; r < nr; r++)
                dst[c * rows + r0 + r] = band[r * cols + c];
    }
}

static int tensor_to_float(const sae__torch_dict *d, const sae__torch_tensor *t, float *dst,
                           bool transpose);

int sae__torch_tensor_to_float(const sae__torch_dict *d, const sae__torch_tensor *t, float *dst)
{
    return tensor_to_float(d, t, dst, false);
}

int sae__torch_tensor_to_float_t(const sae__torch_dict *d, const sae__torch_tensor *t, float *dst)
{
    if (t->ndim != 2)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' has %zu dimensions, not 2", d->path,
                         t->name, t->ndim);
    if (t->contiguous || t->count == 0)
        return tensor_to_float(d, t, dst, true);
    /* A strided view: gathered whole, then transposed. */
    float *tmp = sae__alloc(t->count, sizeof(float), t->name);
    if (tmp == NULL)
        return SAE_ENOMEM;
    int rc = tensor_to_float(d, t, tmp, false);
    if (rc == SAE_OK)
        scatter_band(tmp, 0, t->shape[0], t->shape[0], t->shape[1], dst);
    free(tmp);
    return rc;
}

/* transpose: t is 2-D and contiguous; its rows are read a band at a time and written into
 * dst as [cols][rows], so no whole-tensor copy is held. */
static int tensor_to_float(const sae__torch_dict *d, const sae__torch_tensor *t, float *dst,
                           bool transpose)
{
    if (t->count == 0)
        return SAE_OK;
    const sae__torch_storage *s = &d->storages[t->storage];
    size_t es = sae__torch_dtype_size(s->dtype);
    /* Elements offset .. last (checked inside the storage when the tensor was read). */
    size_t last = t->offset;
    for (size_t i = 0; i < t->ndim; i++)
        last += (t->shape[i] - 1) * t->stride[i];
    size_t span = last - t->offset + 1;
    zip_file_t *zf = zip_fopen_index(d->za, s->index, 0);
    if (zf == NULL)
        return sae__fail(SAE_EFORMAT, "%s: cannot read member '%s': %s", d->path, s->member,
                         zip_strerror(d->za));
    int rc = read_exact(d, zf, s->member, NULL, t->offset * es);
    if (rc == SAE_OK && transpose) {
        enum { BAND = 64 };
        const size_t rows = t->shape[0], cols = t->shape[1];
        float *band = sae__alloc(BAND * cols, sizeof(float), "transpose band");
        unsigned char *raw = band == NULL ? NULL : sae__alloc(cols, es, "transpose row");
        if (raw == NULL)
            rc = SAE_ENOMEM;
        for (size_t r0 = 0; r0 < rows && rc == SAE_OK; r0 += BAND) {
            const size_t nr = rows - r0 < BAND ? rows - r0 : BAND;
            for (size_t r = 0; r < nr && rc == SAE_OK; r++)
                if ((rc = read_exact(d, zf, s->member, raw, cols * es)) == SAE_OK)
                    convert(s->dtype, raw, cols, band + r * cols);
            if (rc == SAE_OK)
                scatter_band(band, r0, nr, rows, cols, dst);
        }
        free(raw);
        free(band);
    } else if (rc == SAE_OK && t->contiguous) {
        unsigned char buf[1 << 16];
        size_t per = sizeof buf / es;
        for (size_t i = 0; i < t->count && rc == SAE_OK; i += per) {
            size_t n = t->count - i < per ? t->count - i : per;
            if ((rc = read_exact(d, zf, s->member, buf, n * es)) == SAE_OK)
                convert(s->dtype, buf, n, dst + i);
        }
    } else if (rc == SAE_OK) {
        unsigned char *buf = sae__alloc(span, es, s->member);
        if (buf == NULL)
            rc = SAE_ENOMEM;
        else if ((rc = read_exact(d, zf, s->member, buf, span * es)) == SAE_OK)
            gather(t, buf, dst);
        free(buf);
    }
    /* Read to the member's end: that is where libzip checks the CRC. */
    if (rc == SAE_OK && last + 1 == s->numel) {
        unsigned char extra;
        zip_int64_t got = zip_fread(zf, &extra, 1);
        if (got != 0)
            rc = sae__fail(SAE_EFORMAT, "%s: member '%s': %s", d->path, s->member,
                           got < 0 ? zip_file_strerror(zf) : "data past the storage");
    }
    zip_fclose(zf);
    return rc;
}

int sae__torch_number(const sae__torch_dict *d, const char *name, double *out)
{
    const entry *e = find_entry(d, name);
    if (e == NULL)
        return sae__fail(SAE_EFORMAT, "%s: no entry '%s'", d->path, name);
    if (e->s != NULL) {
        if (e->s->kind == SAE__TORCH_STR)
            return sae__fail(SAE_EFORMAT, "%s: entry '%s' is a string, not a number", d->path,
                             name);
        *out = e->s->f;
        return SAE_OK;
    }
    if (e->t->count != 1)
        return sae__fail(SAE_EFORMAT, "%s: entry '%s' is a tensor of %zu elements, not a number",
                         d->path, name, e->t->count);
    float f;
    int rc = sae__torch_tensor_to_float(d, e->t, &f);
    if (rc == SAE_OK)
        *out = f;
    return rc;
}
