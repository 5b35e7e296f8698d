/* The serving forward of the GCN policy, fused per graph (CPU).
 *
 * Why native: the torch rendering is ~80 library ops per forward, each a pass over the
 * batch's activations in memory (a [4096, 64] float32 tensor is 1 MiB, larger than L1 and
 * half of L2) plus ~5-10 us of dispatch; at the model's shapes (K = 40-64) that is 2.5-6x
 * the time of the matrix products alone. Graphs are independent, so this file runs the
 * whole network for ONE graph at a time while its activations stay in L1/L2: every layer
 * is one register-blocked product with its bias, ReLU, aggregation and residual applied
 * in the same pass. See tamiyo/policy/fused.py for the Python side (weight packing, the
 * check against the compiled forward, output views) and model.py / engine.ServingForward
 * for the arithmetic this mirrors op for op.
 *
 * Portable C with GCC/Clang vector extensions: a vf is one register of floats of the width
 * the -march the extension was built with gives (setup.py): AVX-512, AVX/AVX2, or 128-bit
 * (SSE, and NEON elsewhere).
 * No -ffast-math: NaN and inf propagate as in torch (a NaN logit must not become a
 * decision).
 *
 * Entry point: forward(params, layout, dims, scale, tie_tol,
 *                      graphs, fields, output) -> [output]
 *   params   float32 [*]  packed weights (fused.py: each Linear as W^T [in, out_pad] then
 *                         bias [out_pad], out_pad a multiple of 16, padding zero)
 *   layout   int64 [L + 7, 5]  per Linear: in, out, out_pad, w_offset, b_offset (floats)
 *   dims     (F, H, L, Hk, HH, Fk)  node features, hidden, GCN layers, kernel hidden,
 *                         graph-head hidden, kernel features
 *   graphs   list of GraphTensors (their own arrays are read, no copy): x float32
 *            [n_g, F]; adj.crow int64 [n_g + 1] and adj.col int64 [nnz_g] (A-hat in CSR,
 *            local indices); adj.val float32 [nnz_g]; kernel_x float32 [k_g, Fk];
 *            target_mask bool [n_g]
 *   fields   indices of x, kernel_x, target_mask, adj in a GraphTensors
 *   output   the PolicyOutput NamedTuple type
 *   returns one output per graph: (target_probs float32 [n_g], pair_logp float32
 *   [n_g, k_g] (-inf for invalid pairs), noop_logp, adapt_prob, best_node (-1 none),
 *   best_kernel (-1 none), urgency, value); the arrays are views of one buffer per call.
 * Every array's type, size and every CSR index is checked before any is read (ValueError
 * naming the graph and field).
 * The GIL is released while the graphs are computed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VW 16 /* the layout's unit: every width is padded to a multiple of 16 floats */
#define MAX_WIDTH 65536 /* bound on any layer width (fused.py's models are <= 4096) */

/* Arithmetic runs on vectors of the machine's own width (VN floats), not on 16-float
 * vectors: GCC lowers a 64-byte vector extension type on AVX2 or SSE by keeping it in
 * memory, round-tripping every FMA's result through the stack and general registers
 * (measured on a Zen 3 with AVX2: 284 us for a 36-node graph against 40 us with
 * native-width vectors). A VW-wide row is VW / VN of them.
 *
 * Register tile of the products: TR rows x TC vectors of outputs, TR * TC accumulators +
 * TC weight vectors + 1 broadcast within the register file. AVX-512 has 32 registers
 * (6 x 4: measured 8-20 % faster than 4 rows at 10-200-node graphs); AVX and SSE have 16
 * (6 x 2: 6 x 16 floats on AVX, the classic AVX2 kernel, faster than 4 x 2 or 2 x 2 here;
 * 6 x 8 floats on SSE, where the multiply and add without FMA need one more temporary and
 * fill all 16). */
#if defined(__AVX512F__)
#define VN 16
#define TR 6
#define TC 4
#define ISA "avx512"
#elif defined(__AVX__)
#define VN 8
#define TR 6
#define TC 2
#if defined(__AVX2__)
#define ISA "avx2"
#else
#define ISA "avx"
#endif
#else /* SSE, or any 128-bit target */
#define VN 4
#define TR 6
#define TC 2
#if defined(__SSE2__)
#define ISA "sse"
#else
#define ISA "128-bit"
#endif
#endif
typedef float vf __attribute__((vector_size(VN * 4)));
typedef int32_t vi __attribute__((vector_size(VN * 4)));
/* Memory access type: rows are only float-aligned. */
typedef float vf_mem __attribute__((vector_size(VN * 4), aligned(4), may_alias));
#if !((TR == 1 || TR == 2 || TR == 4 || TR == 6) && (TC == 1 || TC == 2 || TC == 4))
#error "gemm's tail cases cover TR in {1, 2, 4, 6} and TC in {1, 2, 4}"
#endif

static inline vf vload(const float *p) { return *(const vf_mem *)p; }
static inline void vstore(float *p, vf v) { *(vf_mem *)p = v; }
static inline vf vsplat(float a)
{
#if VN == 16
    return (vf){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a};
#elif VN == 8
    return (vf){a, a, a, a, a, a, a, a};
#else
    return (vf){a, a, a, a};
#endif
}

/* max(v, 0) that keeps NaN (as torch.relu): zero the lanes that are <= 0. */
static inline vf vrelu(vf v) { return (vf)((vi)v & ~(vi)(v <= 0.0f)); }

/* O[r, c] = bias + sum_k A[r, k] W[k, c] (then ReLU) for R rows and C vectors of columns.
 * Called with constant R and C only, so after inlining the accumulators live in
 * registers. */
static inline __attribute__((always_inline)) void tile(
    const int R, const int C, const float *restrict A, long lda, int K,
    const float *restrict W, long ldw, const float *restrict bias, float *restrict O,
    long ldo, int relu)
{
    vf acc[TR][TC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            acc[r][c] = bias ? vload(bias + VN * c) : (vf){0};
    for (int k = 0; k < K; k++) {
        vf w[TC];
        for (int c = 0; c < C; c++)
            w[c] = vload(W + (long)k * ldw + VN * c);
        for (int r = 0; r < R; r++) {
            vf a = vsplat(A[(long)r * lda + k]);
            for (int c = 0; c < C; c++)
                acc[r][c] += a * w[c];
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            vstore(O + (long)r * ldo + VN * c, relu ? vrelu(acc[r][c]) : acc[r][c]);
}

#define TILE_CASES(R)                                                                   \
    switch (C) {                                                                        \
    case 1: tile(R, 1, a, lda, K, w, ldw, b, o, ldo, relu); break;                       \
    TILE_2(R)                                                                           \
    TILE_4(R)                                                                           \
    }
#if TC >= 2
#define TILE_2(R)                                                                       \
    case 2: tile(R, 2, a, lda, K, w, ldw, b, o, ldo, relu); break;
#else
#define TILE_2(R)
#endif
#if TC >= 4
#define TILE_4(R)                                                                       \
    case 3: tile(R, 3, a, lda, K, w, ldw, b, o, ldo, relu); break;                       \
    case 4: tile(R, 4, a, lda, K, w, ldw, b, o, ldo, relu); break;
#else
#define TILE_4(R)
#endif

/* O [n, Mp] = A [n, K] (row stride lda) @ W [K, Mp] + bias (optional), ReLU optional.
 * Mp is a multiple of VW. */
static void gemm(int n, int K, int Mp, const float *A, long lda, const float *W,
                 const float *bias, float *O, long ldo, int relu)
{
    const long ldw = Mp;
    for (int j = 0; j < Mp; j += VN * TC) {
        int C = (Mp - j) / VN;
        if (C > TC)
            C = TC;
        const float *w = W + j, *b = bias ? bias + j : NULL;
        int i = 0;
        for (; i + TR <= n; i += TR) {
            const float *a = A + (long)i * lda;
            float *o = O + (long)i * ldo + j;
            TILE_CASES(TR)
        }
        if (i < n) { /* the last 1 to TR-1 rows */
            const float *a = A + (long)i * lda;
            float *o = O + (long)i * ldo + j;
            switch (n - i) {
            case 1: TILE_CASES(1) break;
#if TR >= 4
            case 2: TILE_CASES(2) break;
            case 3: TILE_CASES(3) break;
#endif
#if TR >= 6
            case 4: TILE_CASES(4) break;
            case 5: TILE_CASES(5) break;
#endif
            }
        }
    }
}

typedef struct {
    int64_t in, out, pad, w, b;
} Linear;

typedef struct {
    const float *params;
    const Linear *lin; /* enc0, enc1, conv[0..L-1], node_head, kenc0, kenc1, gh0, gh1 */
    int F, H, L, Hk, HH, Fk;
    float scale, tie_tol;
} Net;

#define LIN_ENC0 0
#define LIN_ENC1 1
#define LIN_CONV 2
#define LIN_NODE(net) (LIN_CONV + (net)->L)
#define LIN_KENC0(net) (LIN_NODE(net) + 1)
#define LIN_KENC1(net) (LIN_NODE(net) + 2)
#define LIN_GH0(net) (LIN_NODE(net) + 3)
#define LIN_GH1(net) (LIN_NODE(net) + 4)

static inline const float *W_(const Net *net, int i) { return net->params + net->lin[i].w; }
static inline const float *B_(const Net *net, int i) { return net->params + net->lin[i].b; }

#define NSLOT 16
/* Scratch for one group of graphs, sized for the largest group of the batch. */
typedef struct {
    float *x, *a, *h, *t, *nh, *ka, *ke, *ket, *dots, *pair, *rowmax, *e, *poolrow, *pool, *g1,
        *g2;
} Scratch;

static inline float maxnan(float m, float v) { return (v > m || isnan(v)) ? v : m; }

/* Lane-wise maxnan. */
static inline vf vmaxnan(vf m, vf v)
{
    const vi take = (v > m) | (v != v);
    return (vf)(((vi)v & take) | ((vi)m & ~take));
}

/* torch.logaddexp for float32. */
static float logaddexpf_(float a, float b)
{
    if (isnan(a) || isnan(b))
        return NAN;
    if (isinf(a) && a == b)
        return a;
    float m = a > b ? a : b;
    return m + log1pf(expf(-fabsf(a - b)));
}

static float sigmoidf_(float u)
{
    if (u >= 0.0f)
        return 1.0f / (1.0f + expf(-u));
    float e = expf(u);
    return e / (1.0f + e);
}

/* h += relu(bias + sum_e val[e] t[col[e]]) for one row (Hp floats): the row's entries
 * are walked once per 4 vectors of columns, with 4 independent accumulators (one chain
 * per vector would wait on the FMA latency at every entry). */
static inline void aggregate(float *restrict h, const float *restrict t, long Hp,
                             const float *restrict bias, const int64_t *restrict col,
                             const float *restrict val, int nnz)
{
    long c = 0;
    for (; c + 4 * VN <= Hp; c += 4 * VN) {
        vf a0 = vload(bias + c), a1 = vload(bias + c + VN), a2 = vload(bias + c + 2 * VN),
            a3 = vload(bias + c + 3 * VN);
        for (int e = 0; e < nnz; e++) {
            const vf w = vsplat(val[e]);
            const float *r = t + col[e] * Hp + c;
            a0 += w * vload(r);
            a1 += w * vload(r + VN);
            a2 += w * vload(r + 2 * VN);
            a3 += w * vload(r + 3 * VN);
        }
        vstore(h + c, vload(h + c) + vrelu(a0));
        vstore(h + c + VN, vload(h + c + VN) + vrelu(a1));
        vstore(h + c + 2 * VN, vload(h + c + 2 * VN) + vrelu(a2));
        vstore(h + c + 3 * VN, vload(h + c + 3 * VN) + vrelu(a3));
    }
    for (; c < Hp; c += VN) {
        vf acc = vload(bias + c);
        for (int e = 0; e < nnz; e++)
            acc += vsplat(val[e]) * vload(t + col[e] * Hp + c);
        vstore(h + c, vload(h + c) + vrelu(acc));
    }
}

/* One graph's inputs and where its outputs go. */
typedef struct {
    int n, k;
    const float *x, *val, *kx;
    const int64_t *crow_tail, *col;
    const uint8_t *target;
    float *out_pair, *out_tp;
    double *out_per;
} Graph;

#define ROW_BUDGET 256
/* Nodes per group of consecutive graphs run layer by layer together: the row-wise layers
 * (encoder, each GCN layer's product, node head) and the graph head then run as one
 * product per group, so each weight matrix is read from L2 once per group instead of
 * once per graph and the register tiles run across graph boundaries (a 10-node graph
 * alone leaves a 2-row tail per layer). [256, 64] float32 is 64 KiB: the group's
 * activations stay in L2. */

/* The network and its per-graph post-processing (engine.ServingForward) for G graphs
 * with `rows` nodes in all. */
static void group_forward(const Net *net, const Scratch *s, const Graph *gs, int G, int rows)
{
    const int H = net->H, Hk = net->Hk, F = net->F;
    const long Hp = net->lin[LIN_ENC1].pad, NHp = net->lin[LIN_NODE(net)].pad;
    const long Hkp = net->lin[LIN_KENC1(net)].pad, E0p = net->lin[LIN_ENC0].pad;

    /* h = enc1(relu(enc0(x))) [rows, Hp] */
    for (int g = 0, r = 0; g < G; r += gs[g].n, g++)
        memcpy(s->x + (long)r * F, gs[g].x, sizeof(float) * F * gs[g].n);
    gemm(rows, F, (int)E0p, s->x, F, W_(net, LIN_ENC0), B_(net, LIN_ENC0), s->a, E0p, 1);
    gemm(rows, (int)net->lin[LIN_ENC1].in, (int)Hp, s->a, E0p, W_(net, LIN_ENC1),
         B_(net, LIN_ENC1), s->h, Hp, 0);

    /* h = h + relu(A-hat (h W^T) + b), per GCN layer (A-hat is block-diagonal) */
    for (int l = 0; l < net->L; l++) {
        const int li = LIN_CONV + l;
        gemm(rows, H, (int)Hp, s->h, Hp, W_(net, li), NULL, s->t, Hp, 0);
        const float *bias = B_(net, li);
        for (int g = 0, r0 = 0; g < G; r0 += gs[g].n, g++) {
            const Graph *gr = &gs[g];
            const float *t = s->t + (long)r0 * Hp;
            float *h = s->h + (long)r0 * Hp;
            int64_t start = 0;
            for (int i = 0; i < gr->n; i++) {
                const int64_t end = gr->crow_tail[i];
                aggregate(h + i * Hp, t, Hp, bias, gr->col + start, gr->val + start,
                          (int)(end - start));
                start = end;
            }
        }
    }

    /* node head: [score | query] [rows, NHp] */
    gemm(rows, H, (int)NHp, s->h, Hp, W_(net, LIN_NODE(net)), B_(net, LIN_NODE(net)), s->nh,
         NHp, 0);

    /* graph head on [mean-pool | max-pool] [G, 2H] -> no-op logit, urgency logit, value
     * (rows in order, as torch's index_add; lanes are independent columns) */
    for (int g = 0, r0 = 0; g < G; r0 += gs[g].n, g++) {
        const int n = gs[g].n;
        float *pool = s->pool + (long)g * 2 * H;
        for (long c = 0; c < Hp; c += VN) {
            vf sum = (vf){0}, mx = vsplat(-INFINITY);
            for (int i = 0; i < n; i++) {
                const vf v = vload(s->h + (long)(r0 + i) * Hp + c);
                sum += v;
                mx = vmaxnan(mx, v);
            }
            vstore(s->poolrow + c, sum / vsplat((float)n));
            vstore(s->poolrow + Hp + c, mx);
        }
        memcpy(pool, s->poolrow, sizeof(float) * H);
        memcpy(pool + H, s->poolrow + Hp, sizeof(float) * H);
    }
    const long HHp = net->lin[LIN_GH0(net)].pad;
    gemm(G, 2 * H, (int)HHp, s->pool, 2 * H, W_(net, LIN_GH0(net)), B_(net, LIN_GH0(net)), s->g1,
         HHp, 1);
    gemm(G, net->HH, VW, s->g1, HHp, W_(net, LIN_GH1(net)), B_(net, LIN_GH1(net)), s->g2, VW, 0);

    for (int g = 0, r0 = 0; g < G; r0 += gs[g].n, g++) {
        const Graph *gr = &gs[g];
        const int n = gr->n, k = gr->k;
        const float *nh = s->nh + (long)r0 * NHp, *g2 = s->g2 + (long)g * VW;

        /* pair logits [n, k]: score_i + scale <query_i, kemb_j>, -inf where invalid; the
         * dot products are one product query [n, Hk] @ kemb^T [Hk, kp] (kp = k padded) */
        const long kp = (k + VW - 1) / VW * VW;
        if (k > 0) {
            gemm(k, net->Fk, (int)net->lin[LIN_KENC0(net)].pad, gr->kx, net->Fk,
                 W_(net, LIN_KENC0(net)), B_(net, LIN_KENC0(net)), s->ka,
                 net->lin[LIN_KENC0(net)].pad, 1);
            gemm(k, (int)net->lin[LIN_KENC1(net)].in, (int)Hkp, s->ka,
                 net->lin[LIN_KENC0(net)].pad, W_(net, LIN_KENC1(net)), B_(net, LIN_KENC1(net)),
                 s->ke, Hkp, 0);
            for (int d = 0; d < Hk; d++) {
                for (int j = 0; j < k; j++)
                    s->ket[d * kp + j] = s->ke[(long)j * Hkp + d];
                for (long j = k; j < kp; j++)
                    s->ket[d * kp + j] = 0.0f;
            }
            gemm(n, Hk, (int)kp, nh + 1, NHp, s->ket, NULL, s->dots, kp, 0);
        }
        for (int i = 0; i < n; i++) {
            const float score = nh[i * NHp];
            float m = -INFINITY;
            for (int j = 0; j < k; j++) {
                const float v =
                    gr->target[i] ? score + net->scale * s->dots[i * kp + j] : -INFINITY;
                s->pair[(long)i * k + j] = v;
                m = maxnan(m, v);
            }
            s->rowmax[i] = m;
        }
        const float noop = g2[0];

        /* per-graph softmax over (node x kernel) + {no-op}, as engine.ServingForward */
        float pmax = -1e30f; /* no valid pair: not -inf, so no NaN below */
        for (int i = 0; i < n; i++)
            pmax = maxnan(pmax, s->rowmax[i]);
        float z = 0.0f;
        for (int i = 0; i < n; i++) {
            float e = 0.0f;
            for (int j = 0; j < k; j++)
                e += expf(s->pair[(long)i * k + j] - pmax);
            s->e[i] = e;
            z += e;
        }
        const float zc = z < 1.0f ? 1.0f : z; /* clamp(min=1) keeping NaN */
        for (int i = 0; i < n; i++)
            gr->out_tp[i] = s->e[i] / zc;
        const float lse = logaddexpf_(pmax + logf(z), noop);
        for (long p = 0; p < (long)n * k; p++)
            gr->out_pair[p] = s->pair[p] - lse;
        const float noop_logp = noop - lse;

        /* best pair: first node within tie_tol of the max, then its first kernel */
        const float apm = fabsf(pmax);
        const float tol = net->tie_tol * (apm < 1.0f ? 1.0f : apm);
        int best = -1, best_k = -1;
        for (int i = 0; i < n; i++) {
            if (s->rowmax[i] >= pmax - tol) {
                best = i;
                break;
            }
        }
        if (best >= 0) {
            const float *row = s->pair + (long)best * k;
            const float thr = s->rowmax[best] - tol;
            for (int j = 0; j < k; j++) {
                if (row[j] >= thr) {
                    best_k = j;
                    break;
                }
            }
        }
        double *out = gr->out_per;
        out[0] = noop_logp;
        out[1] = -expm1f(noop_logp);
        out[2] = best;
        out[3] = best_k;
        out[4] = sigmoidf_(g2[1]);
        out[5] = g2[2];
    }
}

static void *scratch_alloc(size_t floats)
{
    size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64 + 64;
    return aligned_alloc(64, bytes); /* every slot is written before it is read */
}

/* Per graph: x, crow, col, val, kernel_x, target (the lists' items). */
enum { GX, GCROW, GCOL, GVAL, GKX, GTGT, NG };
static const char *const FIELD[NG] = {"x", "crow", "col", "val", "kernel_x", "target_mask"};
static const int TYPE[NG] = {NPY_FLOAT32, NPY_INT64, NPY_INT64, NPY_FLOAT32, NPY_FLOAT32, NPY_BOOL};
static const int NDIM[NG] = {2, 1, 1, 1, 2, 1};
static PyObject *CSR_NAME[3]; /* "crow", "col", "val": the adjacency's attributes */

typedef struct {
    const void *data;
    npy_intp d0, d1;
} View;

/* A C-contiguous numpy array of the field's type and rank, or 0 with a ValueError. */
static int get_view(PyObject *obj, View *v, int field, Py_ssize_t g)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: %s is not a numpy array", g,
                     FIELD[field]);
        return 0;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    /* ISCARRAY_RO: C order, aligned, native byte order (a '>f4' array would be misread) */
    if (!PyArray_EquivTypenums(PyArray_TYPE(a), TYPE[field]) || PyArray_NDIM(a) != NDIM[field] ||
        !PyArray_ISCARRAY_RO(a)) {
        PyErr_Format(PyExc_ValueError,
                     "fused forward: graph %zd: %s must be a C-contiguous %dD %s array "
                     "(got %dD, type number %d%s)",
                     g, FIELD[field], NDIM[field],
                     TYPE[field] == NPY_FLOAT32 ? "float32"
                     : TYPE[field] == NPY_INT64 ? "int64"
                                                : "bool",
                     PyArray_NDIM(a), PyArray_TYPE(a),
                     PyArray_ISCARRAY_RO(a) ? "" : ", not contiguous, aligned and native-endian");
        return 0;
    }
    v->data = PyArray_DATA(a);
    v->d0 = PyArray_DIM(a, 0);
    v->d1 = NDIM[field] == 2 ? PyArray_DIM(a, 1) : 1;
    return 1;
}

/* Sizes of graph g from its arrays (n nodes, nnz entries, k kernels), or 0 with an error
 * naming what is inconsistent. Indices are read from memory later, so they are checked. */
static int graph_shape(const View *v, Py_ssize_t g, int F, int Fk, int64_t *n, int64_t *nnz,
                       int64_t *k)
{
    const int64_t *crow = v[GCROW].data, *col = v[GCOL].data;
    const npy_intp rows = v[GCROW].d0 - 1;
    if (rows < 1 || crow[0] != 0) {
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: crow must be [0, ...] of N+1 >= 2",
                     g);
        return 0;
    }
    for (npy_intp i = 0; i < rows; i++)
        if (crow[i + 1] < crow[i]) {
            PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: crow decreases at row %zd",
                         g, (Py_ssize_t)i);
            return 0;
        }
    *n = rows;
    *nnz = crow[rows];
    if (v[GCOL].d0 != *nnz || v[GVAL].d0 != *nnz) {
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: col/val do not have %lld entries",
                     g, (long long)*nnz);
        return 0;
    }
    for (int64_t e = 0; e < *nnz; e++)
        if (col[e] < 0 || col[e] >= rows) {
            PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: column %lld out of range",
                         g, (long long)col[e]);
            return 0;
        }
    if (v[GX].d0 != rows || v[GX].d1 != F || v[GTGT].d0 != rows) {
        PyErr_Format(PyExc_ValueError,
                     "fused forward: graph %zd: x / target_mask are not [%zd, %d] / [%zd]", g,
                     (Py_ssize_t)rows, F, (Py_ssize_t)rows);
        return 0;
    }
    if (v[GKX].d1 != Fk) {
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: kernel_x is not [K, %d]", g, Fk);
        return 0;
    }
    *k = v[GKX].d0;
    return 1;
}

/* A float32 view of `base`'s data at `data` with 1 or 2 dims (keeps `base` alive). */
static PyObject *view_of(PyObject *base, float *data, int ndim, npy_intp d0, npy_intp d1)
{
    npy_intp dims[2] = {d0, d1};
    PyObject *v = PyArray_New(&PyArray_Type, ndim, dims, NPY_FLOAT32, NULL, data, 0,
                              NPY_ARRAY_CARRAY, NULL);
    if (!v)
        return NULL;
    Py_INCREF(base);
    if (PyArray_SetBaseObject((PyArrayObject *)v, base) < 0) {
        Py_DECREF(v);
        return NULL;
    }
    return v;
}

/* PolicyOutput(target_probs, pair_logp, noop_logp, adapt_prob, best_node, best_kernel,
 * urgency, value): a tuple subclass without fields of its own (a NamedTuple), built the
 * way tuple.__new__ builds one. Steals the two arrays. */
static PyObject *make_output(PyTypeObject *cls, PyObject *tp, PyObject *pair, const double *per)
{
    PyObject *items[8] = {tp,
                          pair,
                          PyFloat_FromDouble(per[0]),
                          PyFloat_FromDouble(per[1]),
                          PyLong_FromLong((long)per[2]),
                          PyLong_FromLong((long)per[3]),
                          PyFloat_FromDouble(per[4]),
                          PyFloat_FromDouble(per[5])};
    PyObject *out = NULL;
    for (int i = 0; i < 8; i++)
        if (!items[i])
            goto fail;
    out = cls->tp_alloc(cls, 8);
    if (!out)
        goto fail;
    for (int i = 0; i < 8; i++)
        PyTuple_SET_ITEM(out, i, items[i]);
    return out;
fail:
    for (int i = 0; i < 8; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

static PyObject *forward(PyObject *self, PyObject *args)
{
    (void)self;
    PyArrayObject *pa, *la;
    PyObject *given, *graphs_t;
    PyTypeObject *cls;
    int F, H, L, Hk, HH, Fk;
    Py_ssize_t at[4]; /* indices of x, kernel_x, target_mask, adj in a graph tuple */
    double scale, tie_tol;
    if (!PyArg_ParseTuple(args, "O!O!(iiiiii)ddO!(nnnn)O!", &PyArray_Type, &pa, &PyArray_Type,
                          &la, &F, &H, &L, &Hk, &HH, &Fk, &scale, &tie_tol, &PyList_Type, &given,
                          &at[0], &at[1], &at[2], &at[3], &PyType_Type, &cls))
        return NULL;
    /* A tuple of the graphs holds a reference to every array read below while the GIL is
     * released (the list could be changed meanwhile by another thread); the CSR arrays,
     * read as attributes of each graph's adjacency, are held in `held`. */
    if (!(graphs_t = PyList_AsTuple(given)))
        return NULL;
    PyObject **held = NULL;
    PyObject *ret = NULL, *pair_arr = NULL, *tp_arr = NULL;
    float *mem = NULL;
    View *views = NULL;
    Graph *graphs = NULL;
    int64_t *shape = NULL; /* [B, 3]: n, nnz, k */
    double *per = NULL;    /* [B, 6] */
    const Py_ssize_t B = PyTuple_GET_SIZE(graphs_t);
    const int nlin = L + 7;
    if (!PyType_IsSubtype(cls, &PyTuple_Type) || cls->tp_itemsize != PyTuple_Type.tp_itemsize ||
        cls->tp_basicsize != PyTuple_Type.tp_basicsize) {
        PyErr_SetString(PyExc_TypeError, "fused forward: the output type must be a NamedTuple");
        goto done;
    }
    if (F < 1 || H < 1 || L < 0 || Hk < 1 || HH < 1 || Fk < 1) {
        PyErr_SetString(PyExc_ValueError, "fused forward: dims must be positive");
        goto done;
    }
    if (!PyArray_ISCARRAY_RO(la) || !PyArray_EquivTypenums(PyArray_TYPE(la), NPY_INT64) ||
        PyArray_NDIM(la) != 2 || PyArray_DIM(la, 0) != nlin || PyArray_DIM(la, 1) != 5) {
        PyErr_SetString(PyExc_ValueError, "fused forward: layout is not int64 [L + 7, 5]");
        goto done;
    }
    if (!PyArray_ISCARRAY_RO(pa) || !PyArray_EquivTypenums(PyArray_TYPE(pa), NPY_FLOAT32) ||
        PyArray_NDIM(pa) != 1) {
        PyErr_SetString(PyExc_ValueError, "fused forward: params is not a float32 vector");
        goto done;
    }
    const Linear *lin = (const Linear *)PyArray_DATA(la);
    const int64_t nparams = PyArray_DIM(pa, 0);
    for (int i = 0; i < nlin; i++) {
        const Linear *l = &lin[i];
        if (l->in < 1 || l->in > MAX_WIDTH || l->out < 1 || l->pad < l->out ||
            l->pad > MAX_WIDTH || l->pad % VW || l->w < 0 || l->b < 0 ||
            l->w + l->in * l->pad > nparams || l->b + l->pad > nparams) {
            PyErr_Format(PyExc_ValueError, "fused forward: layout row %d is out of range", i);
            goto done;
        }
    }
    const Net net = {(const float *)PyArray_DATA(pa), lin, F, H, L, Hk, HH, Fk, (float)scale,
                     (float)tie_tol};
    const long Hp = lin[LIN_ENC1].pad;
    /* every product's K is the previous layer's true width (its padding is never read) */
    if (lin[LIN_ENC0].in != F || lin[LIN_ENC0].out != H || lin[LIN_ENC1].in != H ||
        lin[LIN_ENC1].out != H || lin[LIN_NODE(&net)].in != H ||
        lin[LIN_NODE(&net)].out != 1 + Hk || lin[LIN_KENC0(&net)].in != Fk ||
        lin[LIN_KENC0(&net)].out != Hk || lin[LIN_KENC1(&net)].in != Hk ||
        lin[LIN_KENC1(&net)].out != Hk || lin[LIN_GH0(&net)].in != 2 * H ||
        lin[LIN_GH0(&net)].out != HH || lin[LIN_GH1(&net)].in != HH ||
        lin[LIN_GH1(&net)].out != 3 || lin[LIN_GH1(&net)].pad != VW) {
        PyErr_SetString(PyExc_ValueError, "fused forward: layout does not match dims");
        goto done;
    }
    for (int l = 0; l < L; l++)
        if (lin[LIN_CONV + l].in != H || lin[LIN_CONV + l].out != H ||
            lin[LIN_CONV + l].pad != Hp) {
            PyErr_SetString(PyExc_ValueError, "fused forward: a GCN layer is not [H, H]");
            goto done;
        }
    if (B < 1) {
        PyErr_SetString(PyExc_ValueError, "fused forward: empty batch");
        goto done;
    }

    views = PyMem_Malloc((size_t)B * NG * sizeof(View));
    shape = PyMem_Malloc((size_t)B * 3 * sizeof(int64_t));
    per = PyMem_Malloc((size_t)B * 6 * sizeof(double));
    graphs = PyMem_Malloc((size_t)B * sizeof(Graph));
    held = PyMem_Calloc((size_t)B * 3, sizeof(PyObject *));
    if (!views || !shape || !per || !graphs || !held) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t N = 0, PT = 0;
    int64_t max_n = 0, max_k = 0;
    for (Py_ssize_t g = 0; g < B; g++) {
        View *v = views + g * NG;
        PyObject *gt = PyTuple_GET_ITEM(graphs_t, g);
        const Py_ssize_t size = PyTuple_Check(gt) ? PyTuple_GET_SIZE(gt) : -1;
        for (int i = 0; i < 4; i++)
            if (at[i] < 0 || at[i] >= size) {
                PyErr_Format(PyExc_ValueError, "fused forward: graph %zd is not a GraphTensors",
                             g);
                goto done;
            }
        PyObject *adj = PyTuple_GET_ITEM(gt, at[3]);
        for (int i = 0; i < 3; i++)
            if (!(held[3 * g + i] = PyObject_GetAttr(adj, CSR_NAME[i])))
                goto done;
        PyObject *items[NG] = {PyTuple_GET_ITEM(gt, at[0]), held[3 * g], held[3 * g + 1],
                               held[3 * g + 2], PyTuple_GET_ITEM(gt, at[1]),
                               PyTuple_GET_ITEM(gt, at[2])};
        for (int f = 0; f < NG; f++)
            if (!get_view(items[f], &v[f], f, g))
                goto done;
        int64_t *sh = shape + 3 * g;
        if (!graph_shape(v, g, F, Fk, &sh[0], &sh[1], &sh[2]))
            goto done;
        N += sh[0];
        PT += sh[0] * sh[2];
        max_n = sh[0] > max_n ? sh[0] : max_n;
        max_k = sh[2] > max_k ? sh[2] : max_k;
    }

    /* Outputs: one array each for all graphs' pair log-probs and target probs. */
    npy_intp pt_dim = PT, n_dim = N;
    pair_arr = PyArray_SimpleNew(1, &pt_dim, NPY_FLOAT32);
    tp_arr = PyArray_SimpleNew(1, &n_dim, NPY_FLOAT32);
    if (!pair_arr || !tp_arr)
        goto done;

    /* Scratch, sized for the largest group. */
    const long wide = Hp > lin[LIN_ENC0].pad ? Hp : lin[LIN_ENC0].pad;
    const long NHp = lin[LIN_NODE(&net)].pad;
    const long kw = lin[LIN_KENC0(&net)].pad > lin[LIN_KENC1(&net)].pad
                        ? lin[LIN_KENC0(&net)].pad
                        : lin[LIN_KENC1(&net)].pad;
    const long kpmax = (max_k + VW - 1) / VW * VW;
    const long rmax = max_n > ROW_BUDGET ? max_n : ROW_BUDGET; /* rows of a group */
    const long gmax = B < ROW_BUDGET ? B : ROW_BUDGET;        /* graphs of a group */
    const size_t sizes[NSLOT] = {(size_t)(rmax * F),
                                 (size_t)(rmax * wide),
                                 (size_t)(rmax * Hp),
                                 (size_t)(rmax * Hp),
                                 (size_t)(rmax * NHp),
                                 (size_t)(max_k * kw + 1),
                                 (size_t)(max_k * kw + 1),
                                 (size_t)(Hk * kpmax + 1),
                                 (size_t)(max_n * kpmax + 1),
                                 (size_t)(max_n * max_k + 1),
                                 (size_t)max_n,
                                 (size_t)max_n,
                                 (size_t)(2 * Hp),
                                 (size_t)(gmax * 2 * H),
                                 (size_t)(gmax * lin[LIN_GH0(&net)].pad),
                                 (size_t)(gmax * VW)};
    size_t total = 0;
    for (int i = 0; i < NSLOT; i++)
        total += (sizes[i] + 15) / 16 * 16;
    mem = scratch_alloc(total);
    if (!mem) {
        PyErr_NoMemory();
        goto done;
    }
    Scratch s;
    float **slots[NSLOT] = {&s.x,   &s.a,    &s.h,      &s.t,       &s.nh,   &s.ka,
                            &s.ke,  &s.ket,  &s.dots,   &s.pair,    &s.rowmax, &s.e,
                            &s.poolrow, &s.pool, &s.g1, &s.g2};
    {
        float *p = mem;
        for (int i = 0; i < NSLOT; i++) {
            *slots[i] = p;
            p += (sizes[i] + 15) / 16 * 16;
        }
    }

    float *opair = PyArray_DATA((PyArrayObject *)pair_arr);
    float *otp = PyArray_DATA((PyArrayObject *)tp_arr);
    for (Py_ssize_t g = 0; g < B; g++) {
        const View *v = views + g * NG;
        const int n = (int)shape[3 * g], k = (int)shape[3 * g + 2];
        graphs[g] = (Graph){n,          k,           v[GX].data, v[GVAL].data,
                            v[GKX].data, (const int64_t *)v[GCROW].data + 1,
                            v[GCOL].data, v[GTGT].data, opair,     otp,
                            per + 6 * g};
        opair += (long)n * k;
        otp += n;
    }
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t g0 = 0; g0 < B;) {
        Py_ssize_t g1 = g0 + 1;
        long rows = graphs[g0].n;
        while (g1 < B && rows + graphs[g1].n <= ROW_BUDGET)
            rows += graphs[g1++].n;
        group_forward(&net, &s, graphs + g0, (int)(g1 - g0), (int)rows);
        g0 = g1;
    }
    Py_END_ALLOW_THREADS;

    ret = PyList_New(B);
    if (!ret)
        goto done;
    for (Py_ssize_t g = 0; g < B; g++) {
        const Graph *gr = &graphs[g];
        PyObject *tp = view_of(tp_arr, gr->out_tp, 1, gr->n, 0);
        PyObject *pair = tp ? view_of(pair_arr, gr->out_pair, 2, gr->n, gr->k) : NULL;
        PyObject *out = pair ? make_output(cls, tp, pair, gr->out_per) : NULL;
        if (!out) {
            if (!pair)
                Py_XDECREF(tp);
            Py_CLEAR(ret);
            goto done;
        }
        PyList_SET_ITEM(ret, g, out);
    }

done:
    free(mem);
    PyMem_Free(views);
    PyMem_Free(shape);
    PyMem_Free(per);
    PyMem_Free(graphs);
    Py_XDECREF(pair_arr);
    Py_XDECREF(tp_arr);
    if (held)
        for (Py_ssize_t i = 0; i < 3 * B; i++)
            Py_XDECREF(held[i]);
    PyMem_Free(held);
    Py_DECREF(graphs_t);
    return ret;
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS,
     "Fused per-graph serving forward (see tamiyo/policy/fused.py)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fused", "Native fused forward of the GCN policy (CPU).", -1, methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void)
{
    import_array();
    const char *names[3] = {"crow", "col", "val"};
    for (int i = 0; i < 3; i++)
        if (!CSR_NAME[i] && !(CSR_NAME[i] = PyUnicode_InternFromString(names[i])))
            return NULL;
    PyObject *m = PyModule_Create(&module);
    /* What this build computes with, for the server's log line and build-info metric: a
     * portable build on an AVX-512 host, or the SSE fallback, is several times slower. */
    if (m && (PyModule_AddStringConstant(m, "ISA", ISA) < 0 ||
              PyModule_AddIntConstant(m, "VECTOR_FLOATS", VN) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
