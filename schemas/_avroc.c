/* schemas._avroc: the engine's hot-path encoder of feed entries, in C (optional build).
 *
 * ``encode_entries(events)`` returns the concatenated feed entries of ``events`` (each
 * ``u32 size | 36-byte header | Avro single-object record``, schemas/wire.py), byte for byte what
 * the pure-Python encoder (schemas.stdavro + schemas.wire) gives, or None when any event is one the
 * fast path does not take (an unknown class, a value that is not an int where a long belongs, beyond
 * a long, text UTF-8 cannot encode, an enum member the writer lacks, a record over the size limit,
 * a negative or too large header key). None is not an error: the caller then encodes the batch in
 * Python, which also builds the UNPUBLISHABLE markers. No Python code runs in here and nothing is
 * cached, so it cannot disagree with the Python encoder on anything but what the tests compare.
 *
 * ``configure(specs, max_record)`` is called once by schemas.wire with the writers' layouts:
 * specs = ((cls, kind, header, key_fields, fields), ...), fields = ((name, code, members), ...)
 * where code is 0 long, 1 string, 2 enum; members (enums only) is ((member, encoded index), ...).
 *
 * Why C: the pure-Python encoder is ~2 us per event (one attribute read, one dict lookup and one
 * join per field), half of the engine service's time (docs/benchmarks.md). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include "_cslots.h" /* slot_offset, bad */
#include <stdint.h>
#include <string.h>

#define MAX_FIELDS 64
#define MAX_MEMBERS 64

typedef struct {
    PyObject *name;                 /* interned attribute name */
    Py_ssize_t offset;              /* of its slot in the instance, or -1: read with getattr */
    int code;                       /* 0 long, 1 string, 2 enum */
    Py_ssize_t nmembers;
    PyObject *members[MAX_MEMBERS]; /* enum members (compared by identity: enum members are singletons) */
    unsigned char enc[MAX_MEMBERS][10];
    unsigned char enc_len[MAX_MEMBERS];
} Field;

typedef struct {
    PyTypeObject *cls;
    unsigned char kind;
    unsigned char header[16];
    Py_ssize_t header_len;
    PyObject *key1, *key2; /* attribute names of the header keys; key2 may be NULL (written as 0) */
    Py_ssize_t key1_off, key2_off, epoch_off, seq_off;
    Py_ssize_t nfields;
    Field fields[MAX_FIELDS];
} Spec;

#define MAX_SPECS 8
static Spec *specs[MAX_SPECS];
static Py_ssize_t nspecs = 0;
static Py_ssize_t max_record = 8192;
static PyObject *s_epoch, *s_seq;

typedef struct {
    unsigned char *buf;
    Py_ssize_t len, cap;
} Out;

#define KEEP (256 * 1024)
static unsigned char *keep_buf = NULL;
static Py_ssize_t keep_cap = 0;

static int out_reserve(Out *o, Py_ssize_t extra) {
    if (o->len + extra <= o->cap) return 0;
    Py_ssize_t cap = o->cap ? o->cap : 1024;
    while (cap < o->len + extra) cap *= 2;
    unsigned char *nb = PyMem_Realloc(o->buf, (size_t)cap);
    if (!nb) return -1;
    o->buf = nb;
    o->cap = cap;
    return 0;
}

static inline Py_ssize_t put_varint(unsigned char *p, uint64_t z) {
    Py_ssize_t n = 0;
    while (z > 0x7F) {
        p[n++] = (unsigned char)((z & 0x7F) | 0x80);
        z >>= 7;
    }
    p[n++] = (unsigned char)z;
    return n;
}

static inline uint64_t zigzag(long long v) { return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63); }

static inline void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xFF);
        v >>= 8;
    }
}

/* The attribute as a new reference, or NULL with no exception set. A slot of an exact instance of
 * the spec's class is read in place (what its member descriptor's __get__ does, without the
 * lookup: configure found the offsets in the class's own descriptors); anything else by getattr. */
static inline PyObject *attr(PyObject *obj, PyObject *name, Py_ssize_t off) {
    if (off >= 0) {
        PyObject *v = *(PyObject **)((char *)obj + off);
        Py_XINCREF(v); /* NULL: an unset slot */
        return v;
    }
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) PyErr_Clear();
    return v;
}

/* An attribute that must be exactly an int within a signed 64-bit long; -1 (no exception) if not. */
static int get_long(PyObject *obj, PyObject *name, Py_ssize_t off, long long *out) {
    PyObject *v = attr(obj, name, off);
    if (!v) return -1;
    if (!PyLong_CheckExact(v)) {
        Py_DECREF(v);
        return -1;
    }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    Py_DECREF(v);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    *out = x;
    return 0;
}

static int get_key(PyObject *obj, PyObject *name, Py_ssize_t off, uint64_t *out) {
    PyObject *v = attr(obj, name, off);
    if (!v) return -1;
    if (!PyLong_CheckExact(v)) {
        Py_DECREF(v);
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = x;
    return 0;
}

/* Appends one event's entry; -1 with no exception: not for the fast path; -2: an exception (memory). */
static int encode_one(Out *o, PyObject *ev) {
    Spec *sp = NULL;
    PyTypeObject *t = Py_TYPE(ev);
    for (Py_ssize_t i = 0; i < nspecs; i++) {
        if (specs[i]->cls == t) {
            sp = specs[i];
            break;
        }
    }
    if (!sp) return -1;
    long long epoch, seq;
    uint64_t k1 = 0, k2 = 0;
    if (get_long(ev, s_epoch, sp->epoch_off, &epoch) || get_long(ev, s_seq, sp->seq_off, &seq) || epoch < 0 ||
        seq < 0)
        return -1;
    if (get_key(ev, sp->key1, sp->key1_off, &k1)) return -1;
    if (sp->key2 && get_key(ev, sp->key2, sp->key2_off, &k2)) return -1;
    const Py_ssize_t prefix = 4 + 36;
    Py_ssize_t start = o->len;
    if (out_reserve(o, prefix + sp->header_len + sp->nfields * 10)) return -2;
    Py_ssize_t pos = start + prefix;
    memcpy(o->buf + pos, sp->header, (size_t)sp->header_len);
    pos += sp->header_len;
    for (Py_ssize_t f = 0; f < sp->nfields; f++) {
        Field *fd = &sp->fields[f];
        if (fd->code == 0) {
            long long x;
            if (get_long(ev, fd->name, fd->offset, &x)) return -1;
            /* room for this varint was reserved with the record (10 bytes per field) */
            pos += put_varint(o->buf + pos, zigzag(x));
        } else if (fd->code == 1) {
            PyObject *v = attr(ev, fd->name, fd->offset);
            if (!v) return -1;
            if (!PyUnicode_CheckExact(v)) {
                Py_DECREF(v);
                return -1;
            }
            Py_ssize_t n;
            const char *s = PyUnicode_AsUTF8AndSize(v, &n);
            if (!s || n > max_record) {
                Py_DECREF(v);
                PyErr_Clear();
                return -1;
            }
            o->len = pos;
            if (out_reserve(o, 10 + n + (sp->nfields - f) * 10)) {
                Py_DECREF(v);
                return -2;
            }
            pos += put_varint(o->buf + pos, zigzag((long long)n));
            memcpy(o->buf + pos, s, (size_t)n);
            pos += n;
            Py_DECREF(v);
        } else {
            PyObject *v = attr(ev, fd->name, fd->offset);
            if (!v) return -1;
            Py_ssize_t m = 0;
            while (m < fd->nmembers && fd->members[m] != v) m++;
            Py_DECREF(v);
            if (m == fd->nmembers) return -1;
            memcpy(o->buf + pos, fd->enc[m], fd->enc_len[m]);
            pos += fd->enc_len[m];
        }
    }
    Py_ssize_t body = pos - start - prefix;
    if (body > max_record) return -1;
    unsigned char *p = o->buf + start;
    p[0] = (unsigned char)(body >> 24);
    p[1] = (unsigned char)(body >> 16);
    p[2] = (unsigned char)(body >> 8);
    p[3] = (unsigned char)body;
    p[4] = 'O';
    p[5] = 'H';
    p[6] = 1; /* schemas.wire.VERSION (configure checks it) */
    p[7] = sp->kind;
    put_be64(p + 8, (uint64_t)epoch);
    put_be64(p + 16, (uint64_t)seq);
    put_be64(p + 24, k1);
    put_be64(p + 32, k2);
    o->len = pos;
    return 0;
}

static PyObject *encode_entries(PyObject *Py_UNUSED(self), PyObject *arg) {
    if (!nspecs) {
        PyErr_SetString(PyExc_RuntimeError, "schemas._avroc is not configured");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(arg, "events must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    /* The buffer stays between calls: a malloc and a free less per command. A call takes it
     * (the GIL is held), so even a nested call, were a getattr to run Python code, gets its own;
     * one of at most KEEP bytes is put back, a larger one (a huge batch) is freed. */
    Out o = {keep_buf, 0, keep_cap};
    keep_buf = NULL;
    keep_cap = 0;
    PyObject *result = NULL;
    if (out_reserve(&o, 64 + n * 256)) { /* an entry of the engine's events is ~100-200 bytes */
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int rc = encode_one(&o, items[i]);
        if (rc == -1) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        if (rc == -2) {
            if (!PyErr_Occurred()) PyErr_NoMemory();
            goto done;
        }
    }
    result = PyBytes_FromStringAndSize((const char *)o.buf, o.len);
done:
    if (o.cap <= KEEP && !keep_buf) {
        keep_buf = o.buf;
        keep_cap = o.cap;
    } else {
        PyMem_Free(o.buf);
    }
    Py_DECREF(seq);
    return result;
}

static void free_specs(void) {
    for (Py_ssize_t i = 0; i < nspecs; i++) {
        Spec *sp = specs[i];
        Py_XDECREF(sp->cls);
        Py_XDECREF(sp->key1);
        Py_XDECREF(sp->key2);
        for (Py_ssize_t f = 0; f < sp->nfields; f++) {
            Py_XDECREF(sp->fields[f].name);
            for (Py_ssize_t m = 0; m < sp->fields[f].nmembers; m++) Py_XDECREF(sp->fields[f].members[m]);
        }
        PyMem_Free(sp);
        specs[i] = NULL;
    }
    nspecs = 0;
}

static int parse_spec(PyObject *t, Spec *sp) {
    PyObject *cls, *header, *keys, *fields;
    int kind;
    if (!PyArg_ParseTuple(t, "OiSOO", &cls, &kind, &header, &keys, &fields)) return -1;
    if (!PyType_Check(cls)) return bad("spec: cls is not a type");
    if (kind < 0 || kind > 255) return bad("spec: kind out of range");
    if (PyBytes_GET_SIZE(header) > 16) return bad("spec: header over 16 bytes");
    sp->cls = (PyTypeObject *)Py_NewRef(cls);
    sp->epoch_off = slot_offset(sp->cls, s_epoch);
    sp->seq_off = slot_offset(sp->cls, s_seq);
    sp->kind = (unsigned char)kind;
    sp->header_len = PyBytes_GET_SIZE(header);
    memcpy(sp->header, PyBytes_AS_STRING(header), (size_t)sp->header_len);
    if (!PyTuple_Check(keys) || PyTuple_GET_SIZE(keys) < 1 || PyTuple_GET_SIZE(keys) > 2)
        return bad("spec: one or two key fields");
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); k++) {
        PyObject *name = PyTuple_GET_ITEM(keys, k);
        if (!PyUnicode_Check(name)) return bad("spec: a key field name is not text");
        Py_INCREF(name);
        PyUnicode_InternInPlace(&name);
        if (k == 0) {
            sp->key1 = name;
            sp->key1_off = slot_offset(sp->cls, name);
        } else {
            sp->key2 = name;
            sp->key2_off = slot_offset(sp->cls, name);
        }
    }
    if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) > MAX_FIELDS) return bad("spec: fields");
    for (Py_ssize_t f = 0; f < PyTuple_GET_SIZE(fields); f++) {
        Field *fd = &sp->fields[f];
        PyObject *name, *members;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(fields, f), "UiO", &name, &fd->code, &members)) return -1;
        Py_INCREF(name);
        PyUnicode_InternInPlace(&name);
        fd->name = name;
        fd->offset = slot_offset(sp->cls, name);
        sp->nfields = f + 1;
        if (fd->code < 0 || fd->code > 2) return bad("spec: field code");
        if (fd->code == 2) {
            if (!PyTuple_Check(members) || PyTuple_GET_SIZE(members) > MAX_MEMBERS) return bad("spec: members");
            for (Py_ssize_t m = 0; m < PyTuple_GET_SIZE(members); m++) {
                PyObject *member, *enc;
                if (!PyArg_ParseTuple(PyTuple_GET_ITEM(members, m), "OS", &member, &enc)) return -1;
                if (PyBytes_GET_SIZE(enc) < 1 || PyBytes_GET_SIZE(enc) > 10) return bad("spec: member encoding");
                fd->members[m] = Py_NewRef(member);
                memcpy(fd->enc[m], PyBytes_AS_STRING(enc), (size_t)PyBytes_GET_SIZE(enc));
                fd->enc_len[m] = (unsigned char)PyBytes_GET_SIZE(enc);
                fd->nmembers = m + 1;
            }
        }
    }
    return 0;
}

static PyObject *configure(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *list;
    Py_ssize_t limit, version;
    if (!PyArg_ParseTuple(args, "Onn", &list, &limit, &version)) return NULL;
    if (version != 1) {
        PyErr_SetString(PyExc_ValueError, "this build writes entry header version 1");
        return NULL;
    }
    if (!PyTuple_Check(list) || PyTuple_GET_SIZE(list) > MAX_SPECS) {
        PyErr_SetString(PyExc_ValueError, "specs: a tuple of at most 8");
        return NULL;
    }
    free_specs();
    max_record = limit;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(list); i++) {
        Spec *sp = PyMem_Calloc(1, sizeof(Spec));
        if (!sp) return PyErr_NoMemory();
        specs[nspecs++] = sp;
        if (parse_spec(PyTuple_GET_ITEM(list, i), sp)) {
            free_specs();
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------ builders
 * ``slots_constructor(cls, names)``: a positional constructor of the slots class ``cls`` that
 * stores each argument in the slot of the same position, what schemas.events.fast_constructor
 * does in Python through a mutable twin and a ``__class__`` assignment (~0.5 us for an
 * OrderUpdate; this is a fraction of it). No __init__ runs, exactly as with the Python one. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyTypeObject *cls;
    Py_ssize_t n;
    Py_ssize_t offsets[MAX_FIELDS];
} Builder;

static PyObject *builder_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Builder *b = (Builder *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if ((kwnames && PyTuple_GET_SIZE(kwnames)) || nargs != b->n) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd positional arguments (%zd given%s)", b->cls->tp_name,
                     b->n, nargs, kwnames && PyTuple_GET_SIZE(kwnames) ? ", and keywords" : "");
        return NULL;
    }
    PyObject *obj = b->cls->tp_alloc(b->cls, 0);
    if (!obj) return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyObject **slot = (PyObject **)((char *)obj + b->offsets[i]);
        *slot = Py_NewRef(args[i]); /* a fresh object's slots are NULL */
    }
    return obj;
}

static void builder_dealloc(PyObject *self) {
    Py_XDECREF(((Builder *)self)->cls);
    PyObject_Free(self);
}

static PyTypeObject BuilderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "schemas._avroc.SlotsConstructor",
    .tp_basicsize = sizeof(Builder),
    .tp_dealloc = builder_dealloc,
    .tp_vectorcall_offset = offsetof(Builder, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A positional constructor of a slots class (schemas._avroc.slots_constructor).",
};

static PyObject *slots_constructor(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *cls, *names;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &cls, &PyTuple_Type, &names)) return NULL;
    PyTypeObject *t = (PyTypeObject *)cls;
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (n < 1 || n > MAX_FIELDS || t->tp_dictoffset != 0 || !t->tp_alloc) {
        PyErr_SetString(PyExc_ValueError, "not a slots class of 1 to 64 fields without a __dict__");
        return NULL;
    }
    Builder *b = PyObject_New(Builder, &BuilderType);
    if (!b) return NULL;
    b->vectorcall = builder_vectorcall;
    b->cls = (PyTypeObject *)Py_NewRef(cls);
    b->n = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        b->offsets[i] = PyUnicode_Check(name) ? slot_offset(t, name) : -1;
        if (b->offsets[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%R is not an object slot of %s itself", name, t->tp_name);
            Py_DECREF(b);
            return NULL;
        }
        for (Py_ssize_t j = 0; j < i; j++) {
            if (b->offsets[j] == b->offsets[i]) {
                PyErr_Format(PyExc_ValueError, "%R is named twice", name);
                Py_DECREF(b);
                return NULL;
            }
        }
    }
    return (PyObject *)b;
}

static PyMethodDef methods[] = {
    {"encode_entries", encode_entries, METH_O, "The feed entries of the events, concatenated; None if any is not for the fast path."},
    {"configure", configure, METH_VARARGS, "configure(specs, max_record, version): the writers' layouts."},
    {"slots_constructor", slots_constructor, METH_VARARGS, "slots_constructor(cls, names): a positional constructor."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "schemas._avroc", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__avroc(void) {
    s_epoch = PyUnicode_InternFromString("epoch");
    s_seq = PyUnicode_InternFromString("seq");
    if (!s_epoch || !s_seq) return NULL;
    if (PyType_Ready(&BuilderType) < 0) return NULL;
    return PyModule_Create(&moduledef);
}
