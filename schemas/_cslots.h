/* Shared by the optional C builds (schemas/_avroc.c, engine/_journalc.c): reading a slots
 * dataclass's fields in place. Header-only (static functions): each extension has its copy. */
#ifndef OHS_CSLOTS_H
#define OHS_CSLOTS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

static int bad(const char *msg) {
    PyErr_SetString(PyExc_ValueError, msg);
    return -1;
}

/* The offset of ``name``'s slot in instances of ``cls`` when the class itself defines it as a plain
 * object slot (a slots dataclass's fields are), else -1: what its member descriptor's __get__
 * reads, found once so that a hot loop reads the slot without the attribute lookup. */
static Py_ssize_t slot_offset(PyTypeObject *cls, PyObject *name) {
    PyObject *d = PyDict_GetItemWithError(cls->tp_dict, name); /* borrowed */
    if (!d) {
        PyErr_Clear();
        return -1;
    }
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type)) return -1;
    PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
    if (m->type != T_OBJECT_EX || m->offset < (Py_ssize_t)sizeof(PyObject) ||
        m->offset + (Py_ssize_t)sizeof(PyObject *) > cls->tp_basicsize)
        return -1;
    return m->offset;
}

#endif
