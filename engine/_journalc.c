/* engine._journalc: the journal's command record, built in C (optional build, setup.py).
 *
 * ``record(cmd, first_seq, count, entries)`` returns the whole record engine.journal.Journal.add
 * stages for a command with its events' entries: ``u32 length | u32 CRC-32 | u64 first_seq |
 * u32 count | u32 packed length | packed command | entries`` (big-endian), byte for byte what
 * the Python code of engine/journal.py builds, or None when the command is one it does not take:
 * not exactly one of the configured classes, an integer that is not exactly an int or is beyond a
 * long, an enum member outside the layout, text that is not exactly a str, that UTF-8 cannot
 * encode or that is longer than 65,535 bytes, or arguments of other types or ranges. None is not
 * an error: the caller then builds the record in Python (the JSON command form included), and
 * raises what Python raises. No Python code runs in here but the CRC-32 function it was given.
 *
 * ``configure(layouts, crc32)``: layouts = ((cls, tag, fields), ...), fields = ((name, code,
 * members), ...) in the order of the packed layout: code 0 a long (8 bytes), 1 an enum member (its
 * index in ``members``, 1 byte), 2 text (its UTF-8 length, 2 bytes; the text itself follows the
 * fixed part, in field order). engine/journal.py passes its ``_LAYOUTS``, and
 * tests/unit/engine_edges/test_journal_native.py compares the records with the Python ones.
 *
 * Why C: packing the command and framing the record in Python cost ~1.3 us per command, the
 * largest part of the engine service after the core (docs/benchmarks.md). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include "_cslots.h" /* slot_offset, bad */
#include <stdint.h>
#include <string.h>

#define MAX_FIELDS 16
#define MAX_MEMBERS 16
#define MAX_LAYOUTS 8
#define MAX_TEXT 65535

typedef struct {
    PyObject *name;    /* interned */
    Py_ssize_t offset; /* of its slot in an exact instance of the class, or -1: read with getattr */
    int code;          /* 0 long, 1 enum, 2 text */
    Py_ssize_t nmembers;
    PyObject *members[MAX_MEMBERS];
} Field;

typedef struct {
    PyTypeObject *cls;
    unsigned char tag;
    Py_ssize_t nfields;
    Field fields[MAX_FIELDS];
} Layout;

static Layout *layouts[MAX_LAYOUTS];
static Py_ssize_t nlayouts = 0;
static PyObject *crc_fn = NULL;

static inline void put_be(unsigned char *p, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xFF);
        v >>= 8;
    }
}

static void free_layouts(void) {
    for (Py_ssize_t i = 0; i < nlayouts; i++) {
        Layout *l = layouts[i];
        Py_XDECREF(l->cls);
        for (Py_ssize_t f = 0; f < l->nfields; f++) {
            Py_XDECREF(l->fields[f].name);
            for (Py_ssize_t m = 0; m < l->fields[f].nmembers; m++) Py_XDECREF(l->fields[f].members[m]);
        }
        PyMem_Free(l);
        layouts[i] = NULL;
    }
    nlayouts = 0;
    Py_CLEAR(crc_fn);
}

static int parse_layout(PyObject *item, Layout *l) {
    PyObject *cls, *fields;
    int tag;
    if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "OiO!", &cls, &tag, &PyTuple_Type, &fields)) return -1;
    if (!PyType_Check(cls)) return bad("a layout's class is not a type");
    if (tag < 0 || tag > 255) return bad("a tag is one byte");
    if (PyTuple_GET_SIZE(fields) > MAX_FIELDS) return bad("too many fields");
    l->cls = (PyTypeObject *)Py_NewRef(cls);
    l->tag = (unsigned char)tag;
    for (Py_ssize_t f = 0; f < PyTuple_GET_SIZE(fields); f++) {
        PyObject *name, *members;
        int code;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(fields, f), "UiO!", &name, &code, &PyTuple_Type, &members)) return -1;
        if (code < 0 || code > 2) return bad("a field's code is 0, 1 or 2");
        if (PyTuple_GET_SIZE(members) > MAX_MEMBERS) return bad("too many enum members");
        Field *fd = &l->fields[f];
        Py_INCREF(name);
        PyUnicode_InternInPlace(&name);
        fd->name = name;
        fd->offset = slot_offset(l->cls, name);
        fd->code = code;
        l->nfields = f + 1;
        for (Py_ssize_t m = 0; m < PyTuple_GET_SIZE(members); m++) {
            fd->members[m] = Py_NewRef(PyTuple_GET_ITEM(members, m));
            fd->nmembers = m + 1;
        }
    }
    return 0;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *items, *crc;
    if (!PyArg_ParseTuple(args, "O!O", &PyTuple_Type, &items, &crc)) return NULL;
    if (!PyCallable_Check(crc)) return PyErr_Format(PyExc_TypeError, "crc32 must be callable");
    if (PyTuple_GET_SIZE(items) > MAX_LAYOUTS) return PyErr_Format(PyExc_ValueError, "too many layouts");
    free_layouts();
    crc_fn = Py_NewRef(crc);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(items); i++) {
        Layout *l = PyMem_Calloc(1, sizeof(Layout));
        if (!l) return PyErr_NoMemory();
        layouts[i] = l;
        nlayouts = i + 1;
        if (parse_layout(PyTuple_GET_ITEM(items, i), l) < 0) {
            free_layouts();
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

typedef struct {
    long long ints[MAX_FIELDS];
    const char *text[MAX_FIELDS];
    Py_ssize_t text_len[MAX_FIELDS];
    PyObject *refs[MAX_FIELDS]; /* the attribute values, held while their UTF-8 is read */
    Py_ssize_t nrefs;
} Values;

static void release(Values *v) {
    for (Py_ssize_t i = 0; i < v->nrefs; i++) Py_DECREF(v->refs[i]);
    v->nrefs = 0;
}

/* Read and check every field; the packed command's size, or -1 (declined, no exception) / -2 (error). */
static Py_ssize_t read_fields(Layout *l, PyObject *cmd, Values *v) {
    Py_ssize_t size = 1;
    for (Py_ssize_t f = 0; f < l->nfields; f++) {
        Field *fd = &l->fields[f];
        PyObject *x;
        if (fd->offset >= 0) { /* what the member descriptor's __get__ does, without the lookup */
            x = *(PyObject **)((char *)cmd + fd->offset);
            if (!x) return -1; /* an unset slot */
            Py_INCREF(x);
        } else if (!(x = PyObject_GetAttr(cmd, fd->name))) {
            PyErr_Clear();
            return -1;
        }
        v->refs[v->nrefs++] = x;
        if (fd->code == 0) {
            if (!PyLong_CheckExact(x)) return -1;
            int overflow = 0;
            long long n = PyLong_AsLongLongAndOverflow(x, &overflow);
            if (overflow || (n == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                return -1;
            }
            v->ints[f] = n;
            size += 8;
        } else if (fd->code == 1) {
            Py_ssize_t m = 0;
            while (m < fd->nmembers && fd->members[m] != x) m++;
            if (m == fd->nmembers) return -1;
            v->ints[f] = m;
            size += 1;
        } else {
            if (!PyUnicode_CheckExact(x)) return -1;
            Py_ssize_t n;
            const char *s = PyUnicode_AsUTF8AndSize(x, &n);
            if (!s) {
                PyErr_Clear(); /* a lone surrogate: the JSON form holds it */
                return -1;
            }
            if (n > MAX_TEXT) return -1;
            v->text[f] = s;
            v->text_len[f] = n;
            size += 2 + n;
        }
    }
    return size;
}

static PyObject *record(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) return PyErr_Format(PyExc_TypeError, "record(cmd, first_seq, count, entries)");
    PyObject *cmd = args[0], *entries = args[3];
    if (!crc_fn || !PyLong_CheckExact(args[1]) || !PyLong_CheckExact(args[2]) || !PyBytes_CheckExact(entries))
        Py_RETURN_NONE;
    unsigned long long first = PyLong_AsUnsignedLongLong(args[1]);
    if (first == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    unsigned long long count = PyLong_AsUnsignedLongLong(args[2]);
    if ((count == (unsigned long long)-1 && PyErr_Occurred()) || count > 0xFFFFFFFFULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Layout *l = NULL;
    for (Py_ssize_t i = 0; i < nlayouts; i++) {
        if (Py_TYPE(cmd) == layouts[i]->cls) {
            l = layouts[i];
            break;
        }
    }
    if (!l) Py_RETURN_NONE;
    Values v;
    v.nrefs = 0;
    Py_ssize_t packed = read_fields(l, cmd, &v);
    if (packed < 0) {
        release(&v);
        Py_RETURN_NONE;
    }
    Py_ssize_t n_entries = PyBytes_GET_SIZE(entries);
    Py_ssize_t payload = 16 + packed + n_entries;
    if ((unsigned long long)payload > 0xFFFFFFFFULL) {
        release(&v);
        Py_RETURN_NONE;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, 8 + payload);
    if (!out) {
        release(&v);
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char *q = p + 8;
    put_be(q, first, 8);
    put_be(q + 8, count, 4);
    put_be(q + 12, (uint64_t)packed, 4);
    q += 16;
    *q++ = l->tag;
    for (Py_ssize_t f = 0; f < l->nfields; f++) {
        int code = l->fields[f].code;
        if (code == 0) {
            put_be(q, (uint64_t)v.ints[f], 8);
            q += 8;
        } else if (code == 1) {
            *q++ = (unsigned char)v.ints[f];
        } else {
            put_be(q, (uint64_t)v.text_len[f], 2);
            q += 2;
        }
    }
    for (Py_ssize_t f = 0; f < l->nfields; f++) {
        if (l->fields[f].code == 2) {
            memcpy(q, v.text[f], (size_t)v.text_len[f]);
            q += v.text_len[f];
        }
    }
    release(&v);
    memcpy(q, PyBytes_AS_STRING(entries), (size_t)n_entries);
    PyObject *view = PyMemoryView_FromMemory((char *)p + 8, payload, PyBUF_READ);
    if (!view) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *crc = PyObject_CallOneArg(crc_fn, view);
    Py_DECREF(view);
    if (!crc) {
        Py_DECREF(out);
        return NULL;
    }
    unsigned long c = PyLong_AsUnsignedLong(crc);
    Py_DECREF(crc);
    if (c == (unsigned long)-1 && PyErr_Occurred()) {
        Py_DECREF(out);
        return NULL;
    }
    put_be(p, (uint64_t)payload, 4);
    put_be(p + 4, (uint64_t)(c & 0xFFFFFFFFUL), 4);
    return out;
}

static PyMethodDef methods[] = {
    {"record", (PyCFunction)(void (*)(void))record, METH_FASTCALL, "The journal record of a command and its entries; None if not for the fast path."},
    {"configure", configure, METH_VARARGS, "configure(layouts, crc32): the packed layouts of the commands."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "engine._journalc", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__journalc(void) { return PyModule_Create(&moduledef); }
