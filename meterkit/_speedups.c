/*
 * meterkit._speedups: the memory backend's steady-state check, compiled.
 *
 * MemoryBackend writes one Python function per operation (meterkit/_memory.py,
 * the reference). A Lane is the same function's common case in C, over the very
 * same state: the slotted containers, dicts and array('q') logs that the Python
 * code reads and writes. It takes the backend's lock like the Python code does.
 *
 * A Lane only does what it can do exactly as the Python does. Anything else -- an
 * idempotency key, a plan of another policy, a month that turned, an organization
 * without this month's account, a sweep that falls due, a number outside int64 --
 * goes to the generated Python function (the fallback) *before* anything is
 * consumed, and that function decides from scratch. A Lane may tidy state first
 * (turn a window, trim a log) just as the Python check does: tidying never changes
 * an outcome. tests/test_speedups.py runs random traces through both and compares
 * every outcome and every piece of state.
 *
 * Slots are read and written at the offsets of their member descriptors (checked
 * to be object slots when a Lane is built, and every object's exact type is
 * checked before its slots are touched).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifdef Py_GIL_DISABLED
/* The lanes read and write shared dicts and counters between the lock and the GIL;
   a free-threaded build gets the pure Python (hatch_build.py falls back on error). */
#error "meterkit._speedups needs a CPython with the GIL"
#endif
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_TIERS 8

enum { FIXED = 0, SLIDING = 1, GCRA = 2, LOG = 3 };

/* -- what setup() records once ------------------------------------------------ */

static PyTypeObject *plan_type, *account_type, *pair_type, *array_type;
/* A key's sliding log (an array of int64s) and its usage record (a Pair of two ints)
 * are made here untracked by Python's garbage collector: they can hold no reference
 * that could close a cycle, and a million tracked ones made a full collection a 0.4 s
 * pause (python bench/bench_core.py --pauses). */
static Py_ssize_t o_plan_cost, o_plan_idem, o_plan_key, o_plan_mode, o_plan_op, o_plan_org,
    o_plan_policy;
static Py_ssize_t o_acct_idents, o_acct_pairs, o_acct_period, o_acct_requests, o_acct_topup, o_acct_used;
static Py_ssize_t o_pair_micro, o_pair_requests;
static PyObject *test_ns, *separator, *typecode_q;
static PyObject *s_operation, *s_org, *s_mode, *s_idempotency_key, *s_cost;
static PyObject *zero;
static PyObject *s_live, *s_test, *s__last, *s__period, *s__accounts, *s__allowances, *s_append, *s_empty;

/* charge ids: a per-process prefix (set from Python, again after a fork) + a counter */
static PyObject *charge_prefix;
static unsigned long long charge_counter;

static Py_ssize_t
member_offset(PyObject *tp, const char *name)
{
    PyObject *d = PyObject_GetAttrString(tp, name);
    if (d == NULL)
        return -1;
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%R.%s is not an object slot", tp, name);
        Py_DECREF(d);
        return -1;
    }
    Py_ssize_t off = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    return off;
}

static inline PyObject *
slot(PyObject *o, Py_ssize_t off) /* borrowed; NULL when unset */
{
    return *(PyObject **)((char *)o + off);
}

static inline void
slot_put(PyObject *o, Py_ssize_t off, PyObject *v) /* steals v */
{
    PyObject **p = (PyObject **)((char *)o + off);
    PyObject *old = *p;
    *p = v;
    Py_XDECREF(old);
}

/* An exact int that fits int64: 0. Anything else: -1, no exception set. */
static inline int
as_i64(PyObject *o, int64_t *out)
{
    if (o == NULL || !PyLong_CheckExact(o))
        return -1;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

static inline int
put_i64(PyObject *o, Py_ssize_t off, int64_t v)
{
    PyObject *n = PyLong_FromLongLong(v);
    if (n == NULL)
        return -1;
    slot_put(o, off, n);
    return 0;
}

static PyObject *
concat3(PyObject *a, PyObject *b, PyObject *c)
{
    Py_ssize_t la = PyUnicode_GET_LENGTH(a), lb = PyUnicode_GET_LENGTH(b),
               lc = PyUnicode_GET_LENGTH(c);
    Py_UCS4 max = PyUnicode_MAX_CHAR_VALUE(a);
    if (PyUnicode_MAX_CHAR_VALUE(b) > max)
        max = PyUnicode_MAX_CHAR_VALUE(b);
    if (PyUnicode_MAX_CHAR_VALUE(c) > max)
        max = PyUnicode_MAX_CHAR_VALUE(c);
    PyObject *r = PyUnicode_New(la + lb + lc, max);
    if (r == NULL)
        return NULL;
    if (PyUnicode_CopyCharacters(r, 0, a, 0, la) < 0 ||
        PyUnicode_CopyCharacters(r, la, b, 0, lb) < 0 ||
        PyUnicode_CopyCharacters(r, la + lb, c, 0, lc) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    return r;
}

static PyObject *
new_charge_id(PyObject *module, PyObject *unused)
{
    char digits[24], *d = digits + sizeof digits;
    unsigned long long v = ++charge_counter;
    do /* the counter in decimal, as str() writes it */
        *--d = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    Py_ssize_t n = digits + sizeof digits - d, lp = PyUnicode_GET_LENGTH(charge_prefix);
    PyObject *r = PyUnicode_New(lp + n, 127);
    if (r == NULL)
        return NULL;
    memcpy(PyUnicode_1BYTE_DATA(r), PyUnicode_1BYTE_DATA(charge_prefix), (size_t)lp);
    memcpy(PyUnicode_1BYTE_DATA(r) + lp, d, (size_t)n);
    return r;
}

static PyObject *
reseed(PyObject *module, PyObject *prefix)
{
    if (!PyUnicode_CheckExact(prefix) || !PyUnicode_IS_ASCII(prefix)) {
        PyErr_SetString(PyExc_TypeError, "the charge id prefix is an ASCII str");
        return NULL;
    }
    Py_INCREF(prefix);
    Py_XSETREF(charge_prefix, prefix);
    charge_counter = 0;
    Py_RETURN_NONE;
}

static PyObject *
setup(PyObject *module, PyObject *args)
{
    PyObject *plan, *account, *pair, *array, *ns;
    if (!PyArg_ParseTuple(args, "O!O!O!O!U", &PyType_Type, &plan, &PyType_Type, &account,
                          &PyType_Type, &pair, &PyType_Type, &array, &ns))
        return NULL;
    if ((o_plan_cost = member_offset(plan, "cost")) < 0 ||
        (o_plan_idem = member_offset(plan, "idem")) < 0 ||
        (o_plan_key = member_offset(plan, "key")) < 0 ||
        (o_plan_mode = member_offset(plan, "mode")) < 0 ||
        (o_plan_op = member_offset(plan, "op")) < 0 ||
        (o_plan_org = member_offset(plan, "org")) < 0 ||
        (o_plan_policy = member_offset(plan, "policy")) < 0 ||
        (o_acct_idents = member_offset(account, "idents")) < 0 ||
        (o_acct_pairs = member_offset(account, "pairs")) < 0 ||
        (o_acct_period = member_offset(account, "period")) < 0 ||
        (o_acct_requests = member_offset(account, "requests")) < 0 ||
        (o_acct_topup = member_offset(account, "topup")) < 0 ||
        (o_acct_used = member_offset(account, "used")) < 0 ||
        (o_pair_micro = member_offset(pair, "micro")) < 0 ||
        (o_pair_requests = member_offset(pair, "requests")) < 0)
        return NULL;
    Py_INCREF(plan);
    Py_INCREF(account);
    Py_INCREF(pair);
    Py_INCREF(array);
    Py_INCREF(ns);
    Py_XSETREF(plan_type, (PyTypeObject *)plan);
    Py_XSETREF(account_type, (PyTypeObject *)account);
    Py_XSETREF(pair_type, (PyTypeObject *)pair);
    Py_XSETREF(array_type, (PyTypeObject *)array);
    Py_XSETREF(test_ns, ns);
    Py_RETURN_NONE;
}


/* -- Lock: the memory backend's lock, which a lane takes without a method call ------ */

#include <pythread.h>

typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    int held;
} Lock;

static PyTypeObject LockType;

/* Take the lock: at once if free, else wait with the GIL released. */
static int
lock_take(Lock *self)
{
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        int ok;
        Py_BEGIN_ALLOW_THREADS
        ok = PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
        if (!ok) {
            PyErr_SetString(PyExc_RuntimeError, "could not take the backend's lock");
            return -1;
        }
    }
    self->held = 1;
    return 0;
}

static void
lock_give(Lock *self)
{
    self->held = 0;
    PyThread_release_lock(self->lock);
}

static PyObject *
lock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    Lock *self = (Lock *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if ((self->lock = PyThread_allocate_lock()) == NULL) {
        Py_DECREF(self);
        PyErr_NoMemory();
        return NULL;
    }
    self->held = 0;
    return (PyObject *)self;
}

static void
lock_dealloc(Lock *self)
{
    if (self->lock != NULL) {
        if (self->held)
            PyThread_release_lock(self->lock);
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
lock_acquire(Lock *self, PyObject *unused)
{
    if (lock_take(self) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *
lock_release(Lock *self, PyObject *unused)
{
    if (!self->held) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    lock_give(self);
    Py_RETURN_NONE;
}

static PyObject *
lock_exit(Lock *self, PyObject *const *args, Py_ssize_t nargs)
{
    return lock_release(self, NULL);
}

static PyObject *
lock_locked(Lock *self, PyObject *unused)
{
    return PyBool_FromLong(self->held);
}

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)lock_acquire, METH_NOARGS, "Take the lock (waiting if need be)."},
    {"release", (PyCFunction)lock_release, METH_NOARGS, "Give the lock back."},
    {"locked", (PyCFunction)lock_locked, METH_NOARGS, "Whether the lock is held."},
    {"__enter__", (PyCFunction)lock_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))lock_exit, METH_FASTCALL, NULL},
    {NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meterkit._speedups.Lock",
    .tp_doc = "A non-reentrant lock, like threading.Lock, that compiled lanes take directly.",
    .tp_basicsize = sizeof(Lock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = lock_new,
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_methods = lock_methods,
};

/* -- Lane ----------------------------------------------------------------------- */

typedef struct {
    int kind, by_key, enforce;
    int64_t W, L, I, TAU, FRESH, LW, L_1W;
    PyObject *state;
    PyTypeObject *state_type;
    Py_ssize_t o1, o2, o3; /* fixed: end, counts; sliding: end, cur, prev;
                              gcra: tats, debt, due; log: logs, debt, due */
} Tier;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *backend, *bdict, *policy, *acquire, *release, *clock, *fallback, *op;
    Lock *lock; /* the backend's lock when it is a Lock: taken without a method call */
    int64_t allowance;
    int credits, any_key;
    unsigned long long hits; /* checks decided here, not handed to the fallback */
    Py_ssize_t n;
    Tier tiers[MAX_TIERS];
} Lane;

static PyObject *lane_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *);

static int
tier_init(Tier *t, PyObject *spec)
{
    PyObject *state;
    long long W, L, I, TAU, FRESH;
    if (!PyArg_ParseTuple(spec, "iiiLLLLLO", &t->kind, &t->by_key, &t->enforce, &W, &L, &I,
                          &TAU, &FRESH, &state))
        return -1;
    if (W <= 0 || L <= 0 || I <= 0 || TAU < 0 || FRESH <= 0 ||
        __builtin_mul_overflow((int64_t)L, (int64_t)W, &t->LW) ||
        __builtin_mul_overflow((int64_t)(L - 1), (int64_t)W, &t->L_1W) || t->LW > (INT64_C(1) << 61)) {
        PyErr_SetString(PyExc_ValueError, "tier parameters out of the compiled range");
        return -1;
    }
    t->W = W, t->L = L, t->I = I, t->TAU = TAU, t->FRESH = FRESH;
    PyObject *tp = (PyObject *)Py_TYPE(state);
    const char *a, *b, *c;
    switch (t->kind) {
    case FIXED: a = "end", b = "counts", c = "end"; break;
    case SLIDING: a = "end", b = "cur", c = "prev"; break;
    case GCRA: a = "tats", b = "debt", c = "due"; break;
    case LOG: a = "logs", b = "debt", c = "due"; break;
    default: PyErr_SetString(PyExc_ValueError, "unknown algorithm"); return -1;
    }
    if ((t->o1 = member_offset(tp, a)) < 0 || (t->o2 = member_offset(tp, b)) < 0 ||
        (t->o3 = member_offset(tp, c)) < 0)
        return -1;
    Py_INCREF(state);
    t->state = state;
    t->state_type = Py_TYPE(state);
    return 0;
}

static PyObject *
lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *backend, *policy, *lock, *clock, *fallback, *op, *tiers;
    long long allowance;
    int credits;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Lane takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOOULpO!", &backend, &policy, &lock, &clock, &fallback,
                          &op, &allowance, &credits, &PyTuple_Type, &tiers))
        return NULL;
    if (plan_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "meterkit._speedups.setup() was not called");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(tiers);
    if (n > MAX_TIERS) {
        PyErr_SetString(PyExc_ValueError, "too many tiers for a compiled lane");
        return NULL;
    }
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = lane_vectorcall;
    self->n = 0;
    self->any_key = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (tier_init(&self->tiers[i], PyTuple_GET_ITEM(tiers, i)) < 0) {
            Py_DECREF(self);
            return NULL;
        }
        self->n = i + 1;
        self->any_key |= self->tiers[i].by_key;
    }
    self->bdict = PyObject_GenericGetDict(backend, NULL);
    if (self->bdict == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->lock = Py_IS_TYPE(lock, &LockType) ? (Lock *)Py_NewRef(lock) : NULL;
    self->acquire = PyObject_GetAttrString(lock, "acquire");
    self->release = PyObject_GetAttrString(lock, "release");
    if (self->acquire == NULL || self->release == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(backend), self->backend = backend;
    Py_INCREF(policy), self->policy = policy;
    Py_INCREF(clock), self->clock = clock;
    Py_INCREF(fallback), self->fallback = fallback;
    Py_INCREF(op), self->op = op;
    self->allowance = allowance;
    self->credits = credits;
    return (PyObject *)self;
}

static int
lane_traverse(Lane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->backend);
    Py_VISIT(self->bdict);
    Py_VISIT(self->policy);
    Py_VISIT(self->lock);
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->clock);
    Py_VISIT(self->fallback);
    Py_VISIT(self->op);
    for (Py_ssize_t i = 0; i < self->n; i++)
        Py_VISIT(self->tiers[i].state);
    return 0;
}

static int
lane_clear(Lane *self)
{
    Py_CLEAR(self->backend);
    Py_CLEAR(self->bdict);
    Py_CLEAR(self->policy);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->op);
    for (Py_ssize_t i = 0; i < self->n; i++)
        Py_CLEAR(self->tiers[i].state);
    return 0;
}

static void
lane_dealloc(Lane *self)
{
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The clock's reading in whole µs, rounded half to even like round(t * 1000000).
   0: done; 1: not a float or int that fits (the Python code decides). */
static int
clock_us(PyObject *t, int64_t *out)
{
    if (PyFloat_CheckExact(t)) {
        double x = PyFloat_AS_DOUBLE(t) * 1000000.0;
        if (!(x > -4e18 && x < 4e18))
            return 1;
        *out = (int64_t)nearbyint(x);
        return 0;
    }
    int64_t v;
    if (as_i64(t, &v) == 0 && !__builtin_mul_overflow(v, INT64_C(1000000), out))
        return 0;
    return 1;
}

static inline int64_t
floor_mod(int64_t a, int64_t m)
{
    int64_t r = a % m;
    return r < 0 ? r + m : r;
}

/* A dict value as int64: 0 found, 1 absent (*out = 0), -1 not an int64 (bail). */
static inline int
dict_i64(PyObject *d, PyObject *k, int64_t *out)
{
    PyObject *v = PyDict_GetItemWithError(d, k);
    if (v == NULL) {
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        *out = 0;
        return 1;
    }
    return as_i64(v, out) == 0 ? 0 : -1;
}

/* A tuple of n new references; NULL (and every one released) if any is NULL. */
static PyObject *
pack(Py_ssize_t n, PyObject **items)
{
    PyObject *t = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    if ((t = PyTuple_New(n)) == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
    return t;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

static PyObject *
tier_tuple(Py_ssize_t n, const int64_t *rem, const int64_t *reset, const int *den, int unspent)
{
    PyObject *each[MAX_TIERS];
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t r = rem[i] + (unspent && !den[i] ? 1 : 0);
        PyObject *parts[3] = {PyLong_FromLongLong(r), PyLong_FromLongLong(reset[i]),
                              PyLong_FromLong(den[i])};
        each[i] = pack(3, parts);
    }
    return pack(n, each);
}

/* now, charged and end come as the objects already at hand (no new int each). */
static PyObject *
outcome(int allowed, int reason, PyObject *now, int64_t retry, PyObject *tiers,
        PyObject *charged, int64_t balance, PyObject *end,
        PyObject *charge) /* steals tiers and charge */
{
    PyObject *parts[10] = {
        Py_NewRef(allowed ? Py_True : Py_False), PyLong_FromLong(reason), Py_NewRef(now),
        PyLong_FromLongLong(retry), tiers, Py_NewRef(charged), PyLong_FromLongLong(balance),
        Py_NewRef(end), charge, Py_NewRef(Py_False)};
    return pack(10, parts);
}

/* Release the lock, keeping any exception that is being raised. */
static int
unlock(Lane *self)
{
    if (self->lock != NULL) {
        lock_give(self->lock);
        return 0;
    }
    PyObject *exc_type, *exc, *tb;
    PyErr_Fetch(&exc_type, &exc, &tb);
    PyObject *r = PyObject_CallNoArgs(self->release);
    if (r == NULL) {
        Py_XDECREF(exc_type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(exc_type, exc, tb);
    return 0;
}

static PyObject *
lane_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Lane *self = (Lane *)callable;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "apply() takes one plan");
        return NULL;
    }
    PyObject *plan = args[0];
    if (Py_TYPE(plan) != plan_type)
        return PyObject_CallOneArg(self->fallback, plan);
    PyObject *policy = slot(plan, o_plan_policy), *idem = slot(plan, o_plan_idem),
             *mode = slot(plan, o_plan_mode), *org = slot(plan, o_plan_org),
             *keyid = slot(plan, o_plan_key);
    PyObject *cost_o = slot(plan, o_plan_cost);
    int64_t cost;
    if (policy != self->policy || idem != Py_None || mode == NULL || org == NULL ||
        keyid == NULL || !PyUnicode_CheckExact(org) || !PyUnicode_CheckExact(keyid) ||
        as_i64(cost_o, &cost) < 0)
        return PyObject_CallOneArg(self->fallback, plan);

    PyObject *orgk = NULL, *key = NULL, *result = NULL, *now_o = NULL;
    PyObject *held[MAX_TIERS] = {NULL}; /* per tier: the dict or log it reads and writes */
    int64_t rem[MAX_TIERS], reset[MAX_TIERS], wait, retry = 0, now, last;
    int64_t cnt[MAX_TIERS], aux[MAX_TIERS];
    int den[MAX_TIERS], denied = 0, bail = 0;
    Py_ssize_t n = self->n;

    int live = mode == s_live ? 1 : PyObject_RichCompareBool(mode, s_live, Py_EQ);
    if (live < 0)
        return NULL;
    if (live) {
        Py_INCREF(org);
        orgk = org;
    }
    else if ((orgk = PyUnicode_Concat(test_ns, org)) == NULL)
        return NULL;
    PyObject *r;
    if (self->lock != NULL) {
        if (lock_take(self->lock) < 0)
            goto done;
    }
    else if ((r = PyObject_CallNoArgs(self->acquire)) == NULL)
        goto done;
    else
        Py_DECREF(r);

    /* -- the lock is held from here to unlock() ------------------------------- */
    PyObject *t = PyObject_CallNoArgs(self->clock);
    if (t == NULL)
        goto error;
    bail = clock_us(t, &now);
    Py_DECREF(t);
    if (bail)
        goto bail;
    PyObject *last_o = PyDict_GetItemWithError(self->bdict, s__last);
    if (as_i64(last_o, &last) < 0)
        goto bail;
    if (now < last) { /* the clock stepped back: hold time at the latest seen */
        now = last;
        now_o = Py_NewRef(last_o);
    }
    else if ((now_o = PyLong_FromLongLong(now)) == NULL ||
             PyDict_SetItem(self->bdict, s__last, now_o) < 0)
        goto error;

    /* -- this month's account, and the key's identity in it ------------------- */
    PyObject *period = PyDict_GetItemWithError(self->bdict, s__period);
    int64_t start, pend, allowance, topup, usedc, balance;
    if (period == NULL || !PyTuple_CheckExact(period) || PyTuple_GET_SIZE(period) != 2 ||
        as_i64(PyTuple_GET_ITEM(period, 0), &start) < 0 ||
        as_i64(PyTuple_GET_ITEM(period, 1), &pend) < 0 || !(start <= now && now < pend))
        goto bail; /* a new month: the Python code turns it */
    PyObject *pend_o = PyTuple_GET_ITEM(period, 1);
    PyObject *accounts = PyDict_GetItemWithError(self->bdict, s__accounts);
    PyObject *acct = accounts == NULL || !PyDict_CheckExact(accounts)
                         ? NULL
                         : PyDict_GetItemWithError(accounts, orgk);
    int64_t aperiod;
    if (acct == NULL || Py_TYPE(acct) != account_type ||
        as_i64(slot(acct, o_acct_period), &aperiod) < 0 || aperiod != start ||
        as_i64(slot(acct, o_acct_topup), &topup) < 0 ||
        as_i64(slot(acct, o_acct_used), &usedc) < 0)
        goto bail; /* no account for this month yet: the Python code opens one */
    PyObject *idents = slot(acct, o_acct_idents);
    int fresh = 0;
    if (idents == NULL || !PyDict_CheckExact(idents))
        goto bail;
    if (self->any_key) { /* one string per key and month, shared by its tiers */
        key = PyDict_GetItemWithError(idents, keyid);
        if (key != NULL)
            Py_INCREF(key);
        else if (PyErr_Occurred() || (key = concat3(orgk, separator, keyid)) == NULL)
            goto error;
        else
            fresh = 1;
    }

    for (Py_ssize_t i = 0; i < n; i++) {
        Tier *tr = &self->tiers[i];
        PyObject *s = tr->state, *who = tr->by_key ? key : orgk;
        int64_t end, c, W = tr->W, L = tr->L;
        den[i] = 0;
        wait = 0;
        if (Py_TYPE(s) != tr->state_type)
            goto bail;
        switch (tr->kind) {
        case FIXED: {
            if (as_i64(slot(s, tr->o1), &end) < 0)
                goto bail;
            if (now >= end) { /* a new window: the old counts are dropped whole */
                PyObject *empty = PyDict_New();
                end = now - floor_mod(now, W) + W;
                if (empty == NULL || put_i64(s, tr->o1, end) < 0) {
                    Py_XDECREF(empty);
                    goto error;
                }
                slot_put(s, tr->o2, empty);
            }
            PyObject *counts = slot(s, tr->o2);
            if (counts == NULL || !PyDict_CheckExact(counts) || dict_i64(counts, who, &c) < 0)
                goto bail;
            Py_INCREF(counts);
            held[i] = counts;
            cnt[i] = c;
            reset[i] = end - now;
            if (c < L)
                rem[i] = L - 1 - c;
            else
                rem[i] = 0, den[i] = 1, wait = reset[i];
            break;
        }
        case SLIDING: {
            int64_t p, used, pr;
            if (as_i64(slot(s, tr->o1), &end) < 0)
                goto bail;
            if (now >= end) { /* a new window: the current one becomes the previous one */
                PyObject *prev, *cur = PyDict_New();
                if (cur == NULL)
                    goto error;
                if (now < end + W) {
                    prev = slot(s, tr->o2);
                    Py_XINCREF(prev);
                }
                else
                    prev = PyDict_New();
                end = now - floor_mod(now, W) + W;
                if (prev == NULL || put_i64(s, tr->o1, end) < 0) {
                    Py_DECREF(cur);
                    Py_XDECREF(prev);
                    goto error;
                }
                slot_put(s, tr->o3, prev);
                slot_put(s, tr->o2, cur);
            }
            PyObject *cur = slot(s, tr->o2), *prev = slot(s, tr->o3);
            if (cur == NULL || prev == NULL || !PyDict_CheckExact(cur) ||
                !PyDict_CheckExact(prev) || dict_i64(cur, who, &c) < 0 ||
                dict_i64(prev, who, &p) < 0)
                goto bail;
            reset[i] = end - now;
            if (c < 0 || p < 0 || __builtin_mul_overflow(p, reset[i], &pr) ||
                __builtin_mul_overflow(c + 1, W, &used) || __builtin_add_overflow(pr, used, &used))
                goto bail;
            Py_INCREF(cur);
            held[i] = cur;
            cnt[i] = c;
            if (used <= tr->LW)
                rem[i] = (tr->LW - used) / W;
            else if (p == 0 && c < L)
                goto bail; /* cannot be (used > LW needs p > 0 here); never divide by 0 */
            else {
                if (c < L) /* p > 0: wait until enough of it has slid out */
                    wait = reset[i] - ((L - 1 - c) * W) / p;
                else /* this window is full: in the next one, cur becomes prev */
                    wait = reset[i] + W - tr->L_1W / c;
                rem[i] = 0, den[i] = 1;
            }
            break;
        }
        case GCRA: {
            PyObject *tats = slot(s, tr->o1);
            int64_t tat, ahead;
            int found;
            if (tats == NULL || !PyDict_CheckExact(tats) || (found = dict_i64(tats, who, &tat)) < 0)
                goto bail;
            aux[i] = found == 0 ? 1 : tr->FRESH; /* the sweep debt this commit adds */
            if (found == 1 || tat < now)
                tat = now;
            if (__builtin_add_overflow(tat, tr->I, &cnt[i])) /* cnt: the new TAT */
                goto bail;
            ahead = cnt[i] - now;
            Py_INCREF(tats);
            held[i] = tats;
            if (ahead <= tr->TAU)
                rem[i] = (tr->TAU - ahead) / tr->I, reset[i] = ahead;
            else
                rem[i] = 0, reset[i] = tat - now, den[i] = 1, wait = ahead - tr->TAU;
            break;
        }
        case LOG: {
            PyObject *logs = slot(s, tr->o1), *log;
            Py_buffer view;
            if (logs == NULL || !PyDict_CheckExact(logs))
                goto bail;
            log = PyDict_GetItemWithError(logs, who);
            if (log == NULL && PyErr_Occurred())
                goto error;
            if (log != NULL && Py_TYPE(log) != array_type)
                goto bail;
            Py_XINCREF(log);
            held[i] = log;
            aux[i] = log == NULL ? tr->FRESH : 1;
            Py_ssize_t len = log == NULL ? 0 : PyObject_Length(log);
            if (len < 0)
                goto error;
            if (len == 0) {
                rem[i] = L - 1, reset[i] = W;
                break;
            }
            if (PyObject_GetBuffer(log, &view, PyBUF_FORMAT) < 0)
                goto error;
            if (view.itemsize != 8 || view.format == NULL || strcmp(view.format, "q") != 0) {
                PyBuffer_Release(&view);
                goto bail;
            }
            const int64_t *v = (const int64_t *)view.buf;
            int64_t cutoff = now - W;
            Py_ssize_t drop = 0;
            if (v[0] <= cutoff) { /* entries a window old no longer count */
                Py_ssize_t lo = 1, hi = len; /* bisect_right(v, cutoff) */
                if (len == 1 || v[1] > cutoff)
                    lo = 1;
                else {
                    while (lo < hi) {
                        Py_ssize_t mid = lo + (hi - lo) / 2;
                        if (cutoff < v[mid])
                            hi = mid;
                        else
                            lo = mid + 1;
                    }
                }
                drop = lo;
            }
            Py_ssize_t m = len - drop;
            if (m < L) {
                rem[i] = L - 1 - m;
                reset[i] = m ? v[drop] + W - now : W;
            }
            else {
                wait = v[drop + m - L] + W - now;
                rem[i] = 0, reset[i] = wait, den[i] = 1;
            }
            PyBuffer_Release(&view);
            if (drop && PySequence_DelSlice(log, 0, drop) < 0)
                goto error;
            break;
        }
        }
        if (den[i] && tr->enforce) {
            denied = 1;
            if (wait > retry)
                retry = wait;
        }
    }

    /* -- credits, checked after the tiers ---------------------------------------- */
    PyObject *allowances = PyDict_GetItemWithError(self->bdict, s__allowances);
    if (allowances == NULL || !PyDict_CheckExact(allowances))
        goto bail;
    int found = dict_i64(allowances, orgk, &allowance);
    if (found < 0)
        goto bail;
    if (found == 1) /* no override: the policy's */
        allowance = self->allowance;
    if (__builtin_add_overflow(allowance, topup, &balance) ||
        __builtin_sub_overflow(balance, usedc, &balance))
        goto bail;
    if (self->credits && cost > balance) {
        int64_t until = pend - now > retry ? pend - now : retry;
        self->hits++;
        result = outcome(0, 2, now_o, until, tier_tuple(n, rem, reset, den, 1), zero, balance,
                         pend_o,
                         (Py_INCREF(s_empty), s_empty));
        goto unlock;
    }
    if (denied) {
        self->hits++;
        result = outcome(0, 1, now_o, retry, tier_tuple(n, rem, reset, den, 1), zero, balance,
                         pend_o,
                         (Py_INCREF(s_empty), s_empty));
        goto unlock;
    }

    /* -- admitted: check that nothing below must fall back, then consume -------- */
    int64_t new_used, new_requests, after;
    if (as_i64(slot(acct, o_acct_requests), &new_requests) < 0 ||
        __builtin_add_overflow(usedc, cost, &new_used) || new_requests == INT64_MAX ||
        __builtin_sub_overflow(balance, cost, &after))
        goto bail;
    new_requests += 1;
    PyObject *pairs = slot(acct, o_acct_pairs);
    if (pairs == NULL || !PyDict_CheckExact(pairs))
        goto bail;
    PyObject *by_key = PyDict_GetItemWithError(pairs, self->op);
    PyObject *pair = NULL;
    int64_t pr = 0, pm = 0;
    if (by_key == NULL && PyErr_Occurred())
        goto error;
    if (by_key != NULL) {
        if (!PyDict_CheckExact(by_key))
            goto bail;
        pair = PyDict_GetItemWithError(by_key, keyid);
        if (pair == NULL && PyErr_Occurred())
            goto error;
        if (pair != NULL &&
            (Py_TYPE(pair) != pair_type || as_i64(slot(pair, o_pair_requests), &pr) < 0 ||
             as_i64(slot(pair, o_pair_micro), &pm) < 0 || pr == INT64_MAX ||
             __builtin_add_overflow(pm, cost, &pm)))
            goto bail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Tier *tr = &self->tiers[i];
        int64_t debt, due;
        if ((tr->kind == GCRA || tr->kind == LOG) && !(den[i] && !tr->enforce)) {
            if (as_i64(slot(tr->state, tr->o2), &debt) < 0 ||
                as_i64(slot(tr->state, tr->o3), &due) < 0 || debt + aux[i] >= due)
                goto bail; /* a sweep falls due: the Python code runs it */
        }
    }

    if (fresh && PyDict_SetItem(idents, keyid, key) < 0)
        goto error;
    for (Py_ssize_t i = 0; i < n; i++) {
        Tier *tr = &self->tiers[i];
        PyObject *who = tr->by_key ? key : orgk, *v;
        if (den[i]) /* a shadow tier that said no consumes nothing */
            continue;
        switch (tr->kind) {
        case FIXED:
        case SLIDING:
        case GCRA:
            v = PyLong_FromLongLong(tr->kind == GCRA ? cnt[i] : cnt[i] + 1);
            if (v == NULL || PyDict_SetItem(held[i], who, v) < 0) {
                Py_XDECREF(v);
                goto error;
            }
            Py_DECREF(v);
            break;
        case LOG:
            v = Py_NewRef(now_o);
            if (held[i] != NULL)
                r = PyObject_CallMethodOneArg(held[i], s_append, v);
            else {
                PyObject *items = PyTuple_Pack(1, v);
                PyObject *logs = slot(tr->state, tr->o1);
                r = items == NULL ? NULL
                                  : PyObject_CallFunctionObjArgs((PyObject *)array_type,
                                                                 typecode_q, items, NULL);
                Py_XDECREF(items);
                if (r != NULL)
                    PyObject_GC_UnTrack(r); /* see array_type */
                if (r != NULL && PyDict_SetItem(logs, who, r) < 0)
                    Py_CLEAR(r);
            }
            Py_DECREF(v);
            if (r == NULL)
                goto error;
            Py_DECREF(r);
            break;
        }
        if (tr->kind == GCRA || tr->kind == LOG) {
            int64_t debt;
            as_i64(slot(tr->state, tr->o2), &debt);
            if (put_i64(tr->state, tr->o2, debt + aux[i]) < 0)
                goto error;
        }
    }
    if (put_i64(acct, o_acct_used, new_used) < 0 ||
        put_i64(acct, o_acct_requests, new_requests) < 0)
        goto error;
    if (by_key == NULL) {
        by_key = PyDict_New();
        if (by_key == NULL || PyDict_SetItem(pairs, self->op, by_key) < 0) {
            Py_XDECREF(by_key);
            goto error;
        }
        Py_DECREF(by_key); /* pairs holds it */
    }
    if (pair == NULL) {
        PyObject *c = PyLong_FromLongLong(cost);
        pair = c == NULL ? NULL : PyObject_CallOneArg((PyObject *)pair_type, c);
        Py_XDECREF(c);
        if (pair != NULL)
            PyObject_GC_UnTrack(pair); /* see array_type */
        if (pair == NULL || PyDict_SetItem(by_key, keyid, pair) < 0) {
            Py_XDECREF(pair);
            goto error;
        }
        Py_DECREF(pair);
    }
    else if (put_i64(pair, o_pair_requests, pr + 1) < 0 || put_i64(pair, o_pair_micro, pm) < 0)
        goto error;
    self->hits++;
    result = outcome(1, 0, now_o, 0, tier_tuple(n, rem, reset, den, 0), cost_o, after, pend_o,
                     new_charge_id(NULL, NULL));
    goto unlock;

bail: /* nothing consumed: the Python code decides, from the start */
    if (PyErr_Occurred())
        goto error;
    if (unlock(self) < 0)
        goto done;
    result = PyObject_CallOneArg(self->fallback, plan);
    goto done;
error:
unlock:
    if (unlock(self) < 0)
        Py_CLEAR(result);
done:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(held[i]);
    Py_XDECREF(orgk);
    Py_XDECREF(key);
    Py_XDECREF(now_o);
    return result;
}

static PyObject *
lane_fallback(Lane *self, void *closure)
{
    Py_INCREF(self->fallback);
    return self->fallback;
}

static PyObject *
lane_repr(Lane *self)
{
    return PyUnicode_FromFormat("<meterkit compiled apply %R>", self->op);
}

static PyMemberDef lane_members[] = {
    {"hits", T_ULONGLONG, offsetof(Lane, hits), READONLY,
     "checks this lane decided itself (the others went to the fallback)"},
    {NULL},
};

static PyGetSetDef lane_getset[] = {
    {"fallback", (getter)lane_fallback, NULL, "the generated Python function this lane mirrors",
     NULL},
    {NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meterkit._speedups.Lane",
    .tp_doc = "One operation's check on a MemoryBackend, compiled; see meterkit/_memory.py.",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = lane_new,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_vectorcall_offset = offsetof(Lane, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_repr = (reprfunc)lane_repr,
    .tp_getset = lane_getset,
    .tp_members = lane_members,
};


/* -- Checker: Meter.check's common case, from arguments to Decision ---------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *slow, *policy, *routes, *reasons, *watch;
    PyTypeObject *decision_type;
    Py_ssize_t o_plan, o_out, o_allowed, o_reason, o_degraded;
} Checker;

/* 1–256 printable ASCII characters. Other text may be valid too: Python decides. */
static inline int
plain_id(PyObject *s)
{
    if (!PyUnicode_CheckExact(s) || !PyUnicode_IS_ASCII(s))
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    if (n == 0 || n > 256)
        return 0;
    const Py_UCS1 *c = PyUnicode_1BYTE_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++)
        if (c[i] < 0x20 || c[i] > 0x7e)
            return 0;
    return 1;
}

static PyObject *
checker_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    /* check(key, *, operation, org=None, idempotency_key=None, cost=None, mode="live") */
    Checker *self = (Checker *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *key, *operation = NULL, *org = NULL, *mode = s_live;
    if (nargs != 1 || kwnames == NULL)
        goto slow;
    key = args[0];
    for (Py_ssize_t i = 0, nk = PyTuple_GET_SIZE(kwnames); i < nk; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *value = args[1 + i];
        if (name == s_operation)
            operation = value;
        else if (name == s_org)
            org = value;
        else if (name == s_mode)
            mode = value;
        else if ((name != s_idempotency_key && name != s_cost) || value != Py_None)
            goto slow; /* an idempotency key, a cost, or what Python should reject */
    }
    if (operation == NULL || org == NULL || (mode != s_live && mode != s_test) ||
        !PyUnicode_CheckExact(operation) || !plain_id(key) || !plain_id(org))
        goto slow;
    PyObject *entry = PyDict_GetItemWithError(self->routes, operation);
    if (entry == NULL) {
        if (PyErr_Occurred())
            return NULL;
        goto slow; /* an unknown operation: Python raises */
    }
    PyObject *plan = plan_type->tp_alloc(plan_type, 0);
    if (plan == NULL)
        return NULL;
    slot_put(plan, o_plan_policy, Py_NewRef(self->policy));
    slot_put(plan, o_plan_op, Py_NewRef(PyTuple_GET_ITEM(entry, 0)));
    slot_put(plan, o_plan_key, Py_NewRef(key));
    slot_put(plan, o_plan_org, Py_NewRef(org));
    slot_put(plan, o_plan_mode, Py_NewRef(mode));
    slot_put(plan, o_plan_cost, Py_NewRef(PyTuple_GET_ITEM(entry, 1)));
    slot_put(plan, o_plan_idem, Py_NewRef(Py_None));
    PyObject *out = PyObject_CallOneArg(PyTuple_GET_ITEM(entry, 2), plan);
    if (out == NULL) {
        Py_DECREF(plan);
        return NULL;
    }
    long reason = -1;
    if (PyTuple_CheckExact(out) && PyTuple_GET_SIZE(out) == 10)
        reason = PyLong_AsLong(PyTuple_GET_ITEM(out, 1));
    if (reason < 0 || reason >= PyTuple_GET_SIZE(self->reasons)) {
        PyErr_Clear();
        PyObject *d = PyObject_CallFunctionObjArgs((PyObject *)self->decision_type, plan, out,
                                                   NULL);
        Py_DECREF(plan);
        Py_DECREF(out);
        return d;
    }
    PyObject *d = self->decision_type->tp_alloc(self->decision_type, 0);
    if (d == NULL) {
        Py_DECREF(plan);
        Py_DECREF(out);
        return NULL;
    }
    slot_put(d, self->o_allowed, Py_NewRef(PyTuple_GET_ITEM(out, 0)));
    slot_put(d, self->o_reason, Py_NewRef(PyTuple_GET_ITEM(self->reasons, reason)));
    slot_put(d, self->o_degraded, Py_NewRef(Py_False));
    slot_put(d, self->o_plan, plan);
    slot_put(d, self->o_out, out);
    if (self->watch != Py_None && PyTuple_GET_ITEM(out, 0) == Py_True) {
        /* shadow tiers may have said no to an admitted request: Python counts them */
        PyObject *r = PyObject_CallOneArg(self->watch, d);
        if (r == NULL) {
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(r);
    }
    return d;
slow:
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static PyObject *
checker_wrapped(Checker *self, void *closure)
{
    return Py_NewRef(self->slow);
}

static PyGetSetDef checker_getset[] = {
    {"__wrapped__", (getter)checker_wrapped, NULL,
     "Meter.check in Python: what this calls for anything unusual (and its signature)", NULL},
    {NULL},
};

static PyObject *
checker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *slow, *policy, *routes, *decision, *reasons, *watch;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Checker takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOO!O!O!O", &slow, &policy, &PyDict_Type, &routes,
                          &PyType_Type, &decision, &PyTuple_Type, &reasons, &watch))
        return NULL;
    if (plan_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "meterkit._speedups.setup() was not called");
        return NULL;
    }
    PyObject *name, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(routes, &pos, &name, &value)) {
        if (!PyUnicode_CheckExact(name) || !PyTuple_CheckExact(value) ||
            PyTuple_GET_SIZE(value) != 3 || !PyLong_CheckExact(PyTuple_GET_ITEM(value, 1))) {
            PyErr_SetString(PyExc_TypeError, "routes map a name to (op, price, apply)");
            return NULL;
        }
    }
    Checker *self = (Checker *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = checker_vectorcall;
    if ((self->o_plan = member_offset(decision, "_plan")) < 0 ||
        (self->o_out = member_offset(decision, "_out")) < 0 ||
        (self->o_allowed = member_offset(decision, "allowed")) < 0 ||
        (self->o_reason = member_offset(decision, "reason")) < 0 ||
        (self->o_degraded = member_offset(decision, "degraded")) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->slow = Py_NewRef(slow);
    self->policy = Py_NewRef(policy);
    self->routes = Py_NewRef(routes);
    self->reasons = Py_NewRef(reasons);
    self->watch = Py_NewRef(watch);
    self->decision_type = (PyTypeObject *)Py_NewRef(decision);
    return (PyObject *)self;
}

static int
checker_traverse(Checker *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slow);
    Py_VISIT(self->policy);
    Py_VISIT(self->routes);
    Py_VISIT(self->reasons);
    Py_VISIT(self->watch);
    Py_VISIT(self->decision_type);
    return 0;
}

static int
checker_clear(Checker *self)
{
    Py_CLEAR(self->slow);
    Py_CLEAR(self->policy);
    Py_CLEAR(self->routes);
    Py_CLEAR(self->reasons);
    Py_CLEAR(self->watch);
    Py_CLEAR(self->decision_type);
    return 0;
}

static void
checker_dealloc(Checker *self)
{
    PyObject_GC_UnTrack(self);
    checker_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject CheckerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meterkit._speedups.Checker",
    .tp_doc = "Meter.check on a MemoryBackend, compiled; anything unusual goes to Python.",
    .tp_basicsize = sizeof(Checker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = checker_new,
    .tp_dealloc = (destructor)checker_dealloc,
    .tp_traverse = (traverseproc)checker_traverse,
    .tp_clear = (inquiry)checker_clear,
    .tp_vectorcall_offset = offsetof(Checker, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getset = checker_getset,
};

/* -- Decision.headers ----------------------------------------------------------------- */

static PyObject *h_policy, *h_ratelimit, *h_limit, *h_remaining, *h_reset, *h_retry,
    *h_charged, *h_credits, *a_header_names, *a_header_limits, *a_policy_header,
    *a_price_text, *a_price;

/* µ-credits as str(Decimal) writes them: "0.01", "10000", "-1.23". */
static PyObject *
credits_text(int64_t m)
{
    char buf[32], *end = buf + sizeof buf, *p = end;
    uint64_t a = m < 0 ? (uint64_t)0 - (uint64_t)m : (uint64_t)m, q = a / 1000000,
             r = a % 1000000;
    if (r) {
        int digits = 6;
        while (r % 10 == 0)
            r /= 10, digits--;
        for (int i = 0; i < digits; i++, r /= 10)
            *--p = (char)('0' + r % 10);
        *--p = '.';
    }
    do
        *--p = (char)('0' + q % 10);
    while ((q /= 10) != 0);
    if (m < 0)
        *--p = '-';
    return PyUnicode_FromStringAndSize(p, end - p);
}

/* ⌈µs / 10⁶⌉ as Python's (x + 999_999) // 1_000_000 (floor division). */
static inline int64_t
ceil_seconds(int64_t us)
{
    int64_t x = us + 999999, q = x / 1000000;
    return (x % 1000000 != 0 && x < 0) ? q - 1 : q;
}

/* Write v in decimal at p; return the end. */
static char *
write_i64(char *p, int64_t v)
{
    char digits[21], *d = digits + sizeof digits;
    uint64_t a = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do
        *--d = (char)('0' + a % 10);
    while ((a /= 10) != 0);
    if (v < 0)
        *p++ = '-';
    memcpy(p, d, (size_t)(digits + sizeof digits - d));
    return p + (digits + sizeof digits - d);
}

static PyObject *
i64_text(int64_t v)
{
    char buf[24];
    return PyUnicode_FromStringAndSize(buf, write_i64(buf, v) - buf);
}

static int
put(PyObject *d, PyObject *name, PyObject *value) /* steals value */
{
    if (value == NULL)
        return -1;
    int r = PyDict_SetItem(d, name, value);
    Py_DECREF(value);
    return r;
}

/* headers(op, outcome, allowed): Decision.headers, or None when a number does not fit
   int64 (then Python renders them). */
static PyObject *
headers(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "headers(op, outcome, allowed)");
        return NULL;
    }
    PyObject *op = args[0], *out = args[1];
    int allowed = PyObject_IsTrue(args[2]);
    int64_t retry, charged, balance, price;
    if (allowed < 0)
        return NULL;
    if (!PyTuple_CheckExact(out) || PyTuple_GET_SIZE(out) < 7 ||
        !PyTuple_CheckExact(PyTuple_GET_ITEM(out, 4)) ||
        as_i64(PyTuple_GET_ITEM(out, 3), &retry) < 0 ||
        as_i64(PyTuple_GET_ITEM(out, 5), &charged) < 0 ||
        as_i64(PyTuple_GET_ITEM(out, 6), &balance) < 0)
        Py_RETURN_NONE;
    PyObject *tiers = PyTuple_GET_ITEM(out, 4), *result = NULL;
    PyObject *names = PyObject_GetAttr(op, a_header_names);
    PyObject *limits = PyObject_GetAttr(op, a_header_limits);
    PyObject *price_o = PyObject_GetAttr(op, a_price);
    PyObject *d = PyDict_New();
    Py_ssize_t n;
    if (names == NULL || limits == NULL || price_o == NULL || d == NULL)
        goto done;
    if (!PyTuple_CheckExact(names) || !PyTuple_CheckExact(limits) ||
        as_i64(price_o, &price) < 0) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    n = PyTuple_GET_SIZE(names);
    if (n != PyTuple_GET_SIZE(tiers)) {
        PyErr_SetString(PyExc_ValueError, "the outcome's tiers do not match the operation's");
        goto done;
    }
    if (n) {
        int64_t rem, reset, best_rem = 0, best_reset = 0;
        Py_ssize_t best = 0, size = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *t = PyTuple_GET_ITEM(tiers, i), *name = PyTuple_GET_ITEM(names, i);
            if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 3 ||
                as_i64(PyTuple_GET_ITEM(t, 0), &rem) < 0 ||
                as_i64(PyTuple_GET_ITEM(t, 1), &reset) < 0 || !PyUnicode_CheckExact(name) ||
                !PyUnicode_IS_ASCII(name)) {
                Py_INCREF(Py_None); /* Python renders it */
                result = Py_None;
                goto done;
            }
            size += PyUnicode_GET_LENGTH(name) + 2 * 21 + 5;
            /* the tightest tier: the first with the fewest remaining, then the soonest reset */
            if (i == 0 || rem < best_rem || (rem == best_rem && reset < best_reset))
                best = i, best_rem = rem, best_reset = reset;
        }
        /* "<name>r=<remaining>;t=<seconds>, ..." written in one buffer (ASCII) */
        char *buf = PyMem_Malloc((size_t)size), *p = buf;
        if (buf == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *t = PyTuple_GET_ITEM(tiers, i), *name = PyTuple_GET_ITEM(names, i);
            as_i64(PyTuple_GET_ITEM(t, 0), &rem);
            as_i64(PyTuple_GET_ITEM(t, 1), &reset);
            if (i)
                *p++ = ',', *p++ = ' ';
            memcpy(p, PyUnicode_1BYTE_DATA(name), (size_t)PyUnicode_GET_LENGTH(name));
            p += PyUnicode_GET_LENGTH(name);
            p = write_i64(p, rem);
            memcpy(p, ";t=", 3);
            p = write_i64(p + 3, ceil_seconds(reset));
        }
        PyObject *value = PyUnicode_FromStringAndSize(buf, p - buf);
        PyMem_Free(buf);
        if (put(d, h_policy, PyObject_GetAttr(op, a_policy_header)) < 0 ||
            put(d, h_ratelimit, value) < 0 ||
            PyDict_SetItem(d, h_limit, PyTuple_GET_ITEM(limits, best)) < 0 ||
            put(d, h_remaining, i64_text(best_rem)) < 0 ||
            put(d, h_reset, i64_text(ceil_seconds(best_reset))) < 0)
            goto done;
    }
    if (!allowed &&
        put(d, h_retry, i64_text(ceil_seconds(retry))) < 0)
        goto done;
    if (put(d, h_charged,
            charged == price ? PyObject_GetAttr(op, a_price_text) : credits_text(charged)) < 0 ||
        put(d, h_credits, credits_text(balance)) < 0)
        goto done;
    result = Py_NewRef(d);
done:
    Py_XDECREF(names);
    Py_XDECREF(limits);
    Py_XDECREF(price_o);
    Py_XDECREF(d);
    return result;
}

/* sweep(states, cutoff, logs): delete from ``states`` in place every entry that can no
 * longer matter -- a sliding log (``logs`` true: an array('q')) that is empty or whose
 * newest entry is at or before ``cutoff``, or a GCRA arrival time (an int) at or before
 * it -- and return how many are kept: _Gcra.sweep and _SlidingLog.sweep without
 * building a new dict in Python (a pass over a million entries took ~0.2 s there).
 * None, having changed nothing, for anything unusual (a value of another type, a
 * number past int64): the Python sweep then runs instead. */
static PyObject *
sweep(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "sweep(dict, cutoff, logs)");
        return NULL;
    }
    PyObject *states = args[0], *key, *value, *dead;
    int overflow = 0, logs = PyObject_IsTrue(args[2]);
    long long cutoff = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (logs < 0 || (cutoff == -1 && PyErr_Occurred()))
        return NULL;
    if (overflow)
        Py_RETURN_NONE;
    dead = PyList_New(0);
    if (dead == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    while (PyDict_Next(states, &pos, &key, &value)) {
        int drop;
        if (logs) {
            Py_buffer view;
            if (Py_TYPE(value) != array_type)
                goto unusual;
            if (PyObject_GetBuffer(value, &view, PyBUF_FORMAT) < 0)
                goto error;
            if (view.itemsize != 8 || view.format == NULL || strcmp(view.format, "q") != 0) {
                PyBuffer_Release(&view);
                goto unusual;
            }
            Py_ssize_t len = view.len / 8;
            drop = len == 0 || ((const int64_t *)view.buf)[len - 1] <= cutoff;
            PyBuffer_Release(&view);
        } else {
            if (!PyLong_CheckExact(value))
                goto unusual;
            long long tat = PyLong_AsLongLongAndOverflow(value, &overflow);
            if (tat == -1 && PyErr_Occurred())
                goto error;
            if (overflow)
                goto unusual;
            drop = tat <= cutoff;
        }
        if (drop && PyList_Append(dead, key) < 0)
            goto error;
    }
    /* (deleted after the pass: a dict must not change size while it is walked) */
    for (Py_ssize_t i = 0, n = PyList_GET_SIZE(dead); i < n; i++)
        if (PyDict_DelItem(states, PyList_GET_ITEM(dead, i)) < 0)
            goto error;
    Py_DECREF(dead);
    return PyLong_FromSsize_t(PyDict_GET_SIZE(states));
unusual:
    Py_DECREF(dead);
    Py_RETURN_NONE;
error:
    Py_DECREF(dead);
    return NULL;
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS,
     "setup(Plan, Account, Pair, array, test_ns): record the types whose slots lanes use"},
    {"new_charge_id", new_charge_id, METH_NOARGS,
     "A fresh id for one admitted charge: the process prefix and a counter."},
    {"reseed", reseed, METH_O, "reseed(prefix): a new prefix, the counter from 1 again"},
    {"headers", (PyCFunction)(void (*)(void))headers, METH_FASTCALL,
     "headers(op, outcome, allowed): Decision.headers (None: let Python render them)"},
    {"sweep", (PyCFunction)(void (*)(void))sweep, METH_FASTCALL,
     "sweep(states, cutoff, logs): drop dead GCRA times or logs in place; how many kept"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meterkit._speedups",
    .m_doc = "The memory backend's hot path, compiled (optional; meterkit runs without it).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&CheckerType) < 0 ||
        PyType_Ready(&LockType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    s_operation = PyUnicode_InternFromString("operation");
    s_org = PyUnicode_InternFromString("org");
    s_mode = PyUnicode_InternFromString("mode");
    s_idempotency_key = PyUnicode_InternFromString("idempotency_key");
    s_cost = PyUnicode_InternFromString("cost");
    s_live = PyUnicode_InternFromString("live");
    s_test = PyUnicode_InternFromString("test");
    s__last = PyUnicode_InternFromString("_last");
    s__period = PyUnicode_InternFromString("_period");
    s__accounts = PyUnicode_InternFromString("_accounts");
    s__allowances = PyUnicode_InternFromString("_allowances");
    s_append = PyUnicode_InternFromString("append");
    s_empty = PyUnicode_New(0, 0);
    h_policy = PyUnicode_InternFromString("RateLimit-Policy");
    h_ratelimit = PyUnicode_InternFromString("RateLimit");
    h_limit = PyUnicode_InternFromString("X-RateLimit-Limit");
    h_remaining = PyUnicode_InternFromString("X-RateLimit-Remaining");
    h_reset = PyUnicode_InternFromString("X-RateLimit-Reset");
    h_retry = PyUnicode_InternFromString("Retry-After");
    h_charged = PyUnicode_InternFromString("X-Credits-Charged");
    h_credits = PyUnicode_InternFromString("X-Credits-Remaining");
    a_header_names = PyUnicode_InternFromString("header_names");
    a_header_limits = PyUnicode_InternFromString("header_limits");
    a_policy_header = PyUnicode_InternFromString("policy_header");
    a_price_text = PyUnicode_InternFromString("price_text");
    a_price = PyUnicode_InternFromString("price");
    if (!h_policy || !h_ratelimit || !h_limit || !h_remaining || !h_reset || !h_retry ||
        !h_charged || !h_credits || !a_header_names || !a_header_limits || !a_policy_header ||
        !a_price_text || !a_price) {
        Py_DECREF(m);
        return NULL;
    }
    zero = PyLong_FromLong(0);
    separator = PyUnicode_FromString("\x1f");
    typecode_q = PyUnicode_FromString("q");
    charge_prefix = PyUnicode_FromString("0000000000000000");
    if (!s_operation || !s_org || !s_mode || !s_idempotency_key || !s_cost || !s_live || !s_test || !s__last || !s__period || !s__accounts || !s__allowances || !s_append ||
        !s_empty || !zero || !separator || !typecode_q || !charge_prefix) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&LockType);
    if (PyModule_AddObject(m, "Lock", (PyObject *)&LockType) < 0) {
        Py_DECREF(&LockType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&CheckerType);
    if (PyModule_AddObject(m, "Checker", (PyObject *)&CheckerType) < 0) {
        Py_DECREF(&CheckerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
