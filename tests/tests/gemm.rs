//! GEMM with fused epilogue against an f64 reference, with a naive same-precision pipeline as
//! the tolerance baseline: sequential f32 dot products, the bias and scale in f32, the naive
//! device GELU in the element type, the residual added in f32, one rounding to E.
//!
//! Covers transposed operands (strided views, no copies), a column slice of a wider fused
//! matrix at an offset, batched and broadcast operands, every epilogue piece, and sizes that
//! divide no tile (M, N, K in {1, 7, 33, 1000, 4097}).

use cubecl::prelude::ComputeClient;
use megabyte_ops::activation::gelu_naive;
use megabyte_ops::gemm::{
    gemm, gemm_naive, gemm_with, linear, matmul, plan, GemmCall, GemmKernel, GemmPlan, GemmProblem,
    OperandLayout,
};
use megabyte_ops::record::Planned;
use megabyte_ops::{ActivationKind, Epilogue, FloatElement, OpError, Tensor, TensorView};
use megabyte_reference::activation::{gelu_scalar, relu_scalar};
use megabyte_tests::plans::{gemm_calls, representatives};
use megabyte_tests::{
    check, kernel_tests, planned_by, read_f64, round, round_all, uniform, with_client,
    DeviceProfile, Dtype, KernelCase, TestRuntime, NAIVE_SAMPLE,
};
use proptest::prelude::*;

/// How an operand is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// Row-major, contiguous.
    Plain,
    /// Stored transposed and read through a view with swapped strides.
    Transposed,
    /// Columns 3.. of a row-major matrix 5 columns wider, read at an offset.
    Slice,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    seed: u64,
    /// The plan this case must launch (the preset regime).
    expect: Option<GemmPlan>,
    batch: usize,
    /// Batched `a` against a rank-2 `b` broadcast over the batch.
    broadcast_b: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Layout,
    b: Layout,
    bias: bool,
    act: Option<ActivationKind>,
    residual: bool,
    scale: f32,
    kernel: GemmKernel,
}

/// A view's offset, shape and strides.
type View = (usize, [usize; 2], [usize; 2]);

/// A batched view of an operand with several entries; a broadcast one is rank 2.
fn view<E: FloatElement>(
    t: &Tensor<TestRuntime, E>,
    entries: usize,
    (off, vs, st): View,
) -> TensorView<'_, TestRuntime, E> {
    let entry = t.len() / entries;
    if entries > 1 {
        t.strided(off, &[entries, vs[0], vs[1]], &[entry, st[0], st[1]])
    } else {
        t.strided(off, &vs, &st)
    }
    .unwrap()
}

/// Stores a logical (rows, cols) row-major matrix per `layout`; returns the buffer and the
/// view's offset, shape and strides.
fn store(
    x: &[f32],
    rows: usize,
    cols: usize,
    layout: Layout,
) -> (Vec<f32>, usize, [usize; 2], [usize; 2]) {
    match layout {
        Layout::Plain => (x.to_vec(), 0, [rows, cols], [cols, 1]),
        Layout::Transposed => {
            let mut t = vec![0f32; x.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = x[r * cols + c];
                }
            }
            (t, 0, [rows, cols], [1, rows])
        }
        Layout::Slice => {
            let w = cols + 5;
            let mut t = uniform(99, rows * w, -9.0, 9.0);
            for r in 0..rows {
                t[r * w + 3..][..cols].copy_from_slice(&x[r * cols..][..cols]);
            }
            (t, 3, [rows, cols], [w, 1])
        }
    }
}

fn activation(act: ActivationKind, x: f64) -> f64 {
    match act {
        ActivationKind::Gelu => gelu_scalar(x),
        ActivationKind::Relu => relu_scalar(x),
    }
}

impl KernelCase for Case {
    planned_by!(GemmPlan, |profile| Planned::Gemm(call) => plan(GemmKernel::Auto, call, profile).ok());

    fn run<E: FloatElement>(&self, client: &ComputeClient<TestRuntime>, case: &str) {
        run_case::<E>(client, *self, case)
    }
}

/// How `Auto` plans a preset's GEMM call on `profile`.
fn auto(call: &GemmCall, profile: &DeviceProfile) -> GemmPlan {
    plan(GemmKernel::Auto, call, profile).expect("a GEMM plan")
}

fn run_case<E: FloatElement>(client: &ComputeClient<TestRuntime>, c: Case, name: &str) {
    let seed = c.seed;
    let r = round_all::<E>;
    let Case { batch, m, n, k, .. } = c;
    // The kernel sees `m` rows per batch entry; the naive error is measured on at least
    // NAIVE_SAMPLE outputs (more rows of A from the same distribution).
    let sm = m.max(NAIVE_SAMPLE.div_ceil(batch * n));
    let b_batch = if c.broadcast_b { 1 } else { batch };
    let a_all = r(uniform(seed, batch * sm * k, -1.0, 1.0));
    let b_all = r(uniform(seed ^ 1, b_batch * k * n, -1.0, 1.0));
    let bias = r(uniform(seed ^ 2, n, -1.0, 1.0));
    let res_all = r(uniform(seed ^ 3, batch * sm * n, -1.0, 1.0));

    // Device operands: A per batch entry is the first m rows of that entry's sample.
    let mut a_kernel = Vec::with_capacity(batch * m * k);
    for bi in 0..batch {
        a_kernel.extend_from_slice(&a_all[bi * sm * k..][..m * k]);
    }
    let mut res_kernel = Vec::with_capacity(batch * m * n);
    for bi in 0..batch {
        res_kernel.extend_from_slice(&res_all[bi * sm * n..][..m * n]);
    }
    // Layouts apply to batch entry matrices; batched operands are stacked (batch, rows, cols).
    let stack = |x: &[f32], nb: usize, rows: usize, cols: usize, layout: Layout| {
        let mut data = vec![];
        let mut view = (0, [0; 2], [0; 2]);
        for bi in 0..nb {
            let (d, off, vs, st) = store(&x[bi * rows * cols..][..rows * cols], rows, cols, layout);
            data.extend(d);
            view = (off, vs, st);
        }
        (data, view)
    };
    let (a_data, a_layout) = stack(&a_kernel, batch, m, k, c.a);
    let (b_data, b_layout) = stack(&b_all, b_batch, k, n, c.b);
    let a_t = Tensor::<TestRuntime, E>::from_f32(client, &a_data, &[a_data.len()]).unwrap();
    let b_t = Tensor::<TestRuntime, E>::from_f32(client, &b_data, &[b_data.len()]).unwrap();
    let (a_view, b_view) = (view(&a_t, batch, a_layout), view(&b_t, b_batch, b_layout));
    let out_shape = if batch > 1 {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    let out = Tensor::<TestRuntime, E>::full(client, &out_shape, f64::NAN).unwrap();
    let bias_t = Tensor::<TestRuntime, E>::from_f32(client, &bias, &[n]).unwrap();
    let res_t = Tensor::<TestRuntime, E>::from_f32(client, &res_kernel, &out_shape).unwrap();
    let mut epi = Epilogue::none().scale(c.scale);
    if c.bias {
        epi = epi.bias(&bias_t);
    }
    if let Some(act) = c.act {
        epi = epi.activation(act);
    }
    if c.residual {
        epi = epi.residual(&res_t);
    }
    gemm_with(c.kernel, &a_view, &b_view, &out, &epi).unwrap();
    let got = read_f64(&out);

    // Reference (f64) and naive pre-activation (f32) over the whole sample, kernel rows first.
    let mut order: Vec<(usize, usize)> = (0..batch)
        .flat_map(|bi| (0..m).map(move |i| (bi, i)))
        .collect();
    order.extend((0..batch).flat_map(|bi| (m..sm).map(move |i| (bi, i))));
    let (mut reference, mut naive_pre, mut residuals) = (vec![], vec![], vec![]);
    for &(bi, i) in &order {
        let arow = &a_all[(bi * sm + i) * k..][..k];
        let bmat = &b_all[if c.broadcast_b { 0 } else { bi * k * n }..][..k * n];
        for j in 0..n {
            let (mut exact, mut dot) = (0f64, 0f32);
            for (kk, &av) in arow.iter().enumerate() {
                exact += av as f64 * bmat[kk * n + j] as f64;
                dot += av * bmat[kk * n + j];
            }
            let mut v = c.scale as f64 * exact;
            let mut nv = c.scale * dot;
            if c.bias {
                v += bias[j] as f64;
                nv += bias[j];
            }
            if let Some(act) = c.act {
                v = activation(act, v);
            }
            let res = res_all[(bi * sm + i) * n + j];
            if c.residual {
                v += res as f64;
            }
            reference.push(v);
            naive_pre.push(nv);
            residuals.push(res);
        }
    }
    let naive_act: Vec<f32> = match c.act {
        Some(ActivationKind::Gelu) => {
            let t =
                Tensor::<TestRuntime, E>::from_f32(client, &naive_pre, &[naive_pre.len()]).unwrap();
            read_f64(&gelu_naive(&t).unwrap())
                .into_iter()
                .map(|v| v as f32)
                .collect()
        }
        Some(ActivationKind::Relu) => naive_pre
            .iter()
            .map(|&v| v.max(0.0))
            .map(|v| round::<E>(v as f64) as f32)
            .collect(),
        None => naive_pre
            .iter()
            .map(|&v| round::<E>(v as f64) as f32)
            .collect(),
    };
    let naive: Vec<f64> = naive_act
        .iter()
        .zip(&residuals)
        .map(|(&v, &res)| {
            round::<E>(if c.residual {
                (v + res) as f64
            } else {
                v as f64
            })
        })
        .collect();
    check::<E>(name, "out", &got, &naive, &reference).unwrap_or_else(|e| panic!("{e}"));
}

fn plain(m: usize, n: usize, k: usize) -> Case {
    Case {
        seed: 0,
        expect: None,
        batch: 1,
        broadcast_b: false,
        m,
        n,
        k,
        a: Layout::Plain,
        b: Layout::Plain,
        bias: false,
        act: None,
        residual: false,
        scale: 1.0,
        kernel: GemmKernel::Auto,
    }
}

/// Sizes from {1, 7, 33, 1000, 4097} in every position, none dividing a tile.
#[rustfmt::skip]
const SIZES: &[(usize, usize, usize)] = &[
    (1, 1, 1), (7, 7, 7), (33, 33, 33), (1, 33, 4097), (1000, 7, 33), (7, 1000, 33),
    (33, 7, 1000), (4097, 33, 7), (33, 4097, 1), (1000, 1000, 7),
];

fn sweep(dtype: Dtype, _: &DeviceProfile) -> Vec<Case> {
    use Layout::*;
    let (f16, base) = (
        dtype != Dtype::F32,
        if dtype == Dtype::F32 { 0 } else { 1000 },
    );
    let mut cases = Vec::new();
    let mut add = |c: Case, seed: u64| {
        cases.push(Case {
            seed: seed + base,
            ..c
        })
    };
    for (i, &(m, n, k)) in SIZES.iter().enumerate() {
        add(plain(m, n, k), 100 + i as u64);
        // The emulated fragments cost a shared-memory round trip per product on a CPU
        // driver: the CMMA path's data movement is checked on the sizes up to 33 × 1000 × 33.
        if f16 && m * n * k <= 33 * 1000 * 33 {
            let kernel = GemmKernel::CmmaEmulated;
            add(
                Case {
                    kernel,
                    ..plain(m, n, k)
                },
                250 + i as u64,
            );
        }
    }
    // Every layout of both operands: f32 on `Auto`, 2-byte floats on the CMMA path.
    let layout_kernel = if f16 {
        GemmKernel::CmmaEmulated
    } else {
        GemmKernel::Auto
    };
    let mut seed = 300;
    for a in [Plain, Transposed, Slice] {
        for b in [Plain, Transposed, Slice] {
            for &(m, n, k) in &[(33, 40, 36), (5, 8, 12), (32, 24, 20)] {
                seed += 1;
                add(
                    Case {
                        a,
                        b,
                        kernel: layout_kernel,
                        ..plain(m, n, k)
                    },
                    seed,
                );
            }
        }
    }
    let acts = [None, Some(ActivationKind::Gelu), Some(ActivationKind::Relu)];
    for (i, act) in acts.into_iter().enumerate() {
        let c = Case {
            bias: true,
            act,
            residual: i != 1,
            scale: 0.5,
            ..plain(70, 36, 65)
        };
        for kernel in [
            GemmKernel::Tiled,
            GemmKernel::Registers,
            GemmKernel::CmmaEmulated,
        ] {
            add(Case { kernel, ..c }, 400 + i as u64);
        }
    }
    // Batched, and batched against a broadcast weight.
    for (i, broadcast_b) in [false, true].into_iter().enumerate() {
        let act = Some(ActivationKind::Gelu);
        let c = Case {
            batch: 3,
            broadcast_b,
            bias: true,
            act,
            ..plain(17, 24, 20)
        };
        if f16 {
            add(
                Case {
                    kernel: GemmKernel::CmmaEmulated,
                    ..c
                },
                520 + i as u64,
            );
        } else {
            add(c, 500 + i as u64);
            add(
                Case {
                    a: Transposed,
                    b: Transposed,
                    ..c
                },
                510 + i as u64,
            );
        }
    }
    cases
}

/// The largest preset case: elements of A, B and out, and multiply-adds (the f64 reference
/// runs on the host).
const PRESET_ELEMENTS: usize = 1 << 22;
const PRESET_MACS: usize = 1 << 27;

/// A GEMM call of [`gemm_calls`] as a case: the layouts it names, one batch entry.
fn case_of(call: &GemmCall) -> Case {
    let GemmProblem { m, n, k, .. } = call.problem;
    let layout = |l: OperandLayout| {
        if l.strides[2] == 1 {
            Layout::Plain
        } else {
            Layout::Transposed
        }
    };
    Case {
        a: layout(call.a),
        b: layout(call.b),
        bias: call.bias,
        act: call.activation,
        residual: call.residual,
        ..plain(m, n, k)
    }
}

/// `call` with K or N halved (the layouts rebuilt for the new sizes), if that keeps `want`.
fn halve(call: &GemmCall, profile: &DeviceProfile, want: &GemmPlan) -> Option<GemmCall> {
    let (at, bt) = (call.a.strides[2] != 1, call.b.strides[2] != 1);
    let rebuild = |m: usize, n: usize, k: usize| GemmCall {
        problem: GemmProblem { batch: 1, m, n, k },
        a: if at {
            OperandLayout::transposed(m)
        } else {
            OperandLayout::row_major(k)
        },
        b: if bt {
            OperandLayout::transposed(k)
        } else {
            OperandLayout::row_major(n)
        },
        ..*call
    };
    let GemmProblem { m, n, k, .. } = call.problem;
    [
        (k % 2 == 0).then(|| rebuild(m, n, k / 2)),
        (n % 2 == 0).then(|| rebuild(m, n / 2, k)),
    ]
    .into_iter()
    .flatten()
    .find(|c| auto(c, profile) == *want)
}

/// Every plan `Auto` gives the presets' GEMMs here (each stack's four linear layers at every
/// row count that reaches another block, training's gradients), the cheapest call of each.
/// A call past this device's size for a test (the paper presets' global stacks: 16,384 wide
/// and more) runs with K and N halved as long as the plan stays the same; a plan no smaller
/// call reaches fails the test.
fn presets(dtype: Dtype, profile: &DeviceProfile) -> Vec<Case> {
    let size = |c: &GemmCall| {
        let GemmProblem { m, n, k, .. } = c.problem;
        (m * k + k * n + m * n, m * n * k)
    };
    let fits = |c: &GemmCall| size(c).0 <= PRESET_ELEMENTS && size(c).1 <= PRESET_MACS;
    let plans = representatives(
        gemm_calls(dtype),
        profile,
        |c, p| Ok(auto(c, p)),
        |c| size(c).1,
    );
    (plans.into_iter().enumerate())
        .map(|(i, (name, mut call, plan))| {
            while !fits(&call) {
                call = halve(&call, profile, &plan)
                    .unwrap_or_else(|| panic!("{name}: no call small enough reaches {plan:?}"));
            }
            Case {
                seed: 2900 + i as u64,
                expect: Some(plan),
                ..case_of(&call)
            }
        })
        .collect()
}

fn any_case() -> impl Strategy<Value = Case> {
    let layout = || prop::sample::select(vec![Layout::Plain, Layout::Transposed, Layout::Slice]);
    let act = prop::sample::select(vec![
        None,
        Some(ActivationKind::Gelu),
        Some(ActivationKind::Relu),
    ]);
    let kernel = prop::sample::select(vec![
        GemmKernel::Auto,
        GemmKernel::Tiled,
        GemmKernel::CmmaEmulated,
    ]);
    let scale = prop::sample::select(vec![1.0f32, 0.125, -2.0]);
    let dims = (
        1usize..4,
        any::<bool>(),
        1usize..150,
        1usize..150,
        1usize..300,
    );
    let epilogue = (any::<bool>(), act, any::<bool>(), scale);
    (dims, layout(), layout(), epilogue, kernel, any::<u64>()).prop_map(
        |((batch, broadcast_b, m, n, k), a, b, (bias, act, residual, scale), kernel, seed)| Case {
            seed,
            expect: None,
            batch,
            broadcast_b: broadcast_b && batch > 1,
            m,
            n,
            k,
            a,
            b,
            bias,
            act,
            residual,
            scale,
            kernel,
        },
    )
}

kernel_tests!(Case, [f32, f16], [sweep, presets], random(6, any_case()));

/// The naive kernel is the bench baseline: it must compute the same product.
#[test]
fn naive_kernel_agrees() {
    with_client!(TestRuntime, |client| {
        let (m, n, k) = (37, 29, 41);
        let a = uniform(7, m * k, -1.0, 1.0);
        let b = uniform(8, k * n, -1.0, 1.0);
        let at = Tensor::<TestRuntime, f32>::from_f32(&client, &a, &[m, k]).unwrap();
        let bt = Tensor::<TestRuntime, f32>::from_f32(&client, &b, &[k, n]).unwrap();
        let out = Tensor::<TestRuntime, f32>::full(&client, &[m, n], f64::NAN).unwrap();
        gemm_naive(&at.view(), &bt.view(), &out).unwrap();
        let tiled = read_f64(&matmul(&at.view(), &bt.view()).unwrap());
        for (i, (x, y)) in read_f64(&out).iter().zip(&tiled).enumerate() {
            assert!((x - y).abs() <= 1e-5, "[{i}]: naive {x}, tiled {y}");
        }
    });
}

#[test]
fn linear_matches_gemm_with_bias_and_activation() {
    with_client!(TestRuntime, |client| {
        let (rows, cin, cout) = (9, 16, 24);
        let x = Tensor::<TestRuntime, f32>::from_f32(
            &client,
            &uniform(1, rows * cin, -1.0, 1.0),
            &[rows, cin],
        )
        .unwrap();
        let w = Tensor::<TestRuntime, f32>::from_f32(
            &client,
            &uniform(2, cin * cout, -1.0, 1.0),
            &[cin, cout],
        )
        .unwrap();
        let bias_v = uniform(3, cout, -1.0, 1.0);
        let b = Tensor::<TestRuntime, f32>::from_f32(&client, &bias_v, &[cout]).unwrap();
        let y = read_f64(&linear(&x, &w, Some(&b), Some(ActivationKind::Relu)).unwrap());
        let mut expected = vec![0f32; rows * cout];
        megabyte_reference::gemm::linear(
            &mut expected,
            &x.to_f32_vec().unwrap(),
            &w.to_f32_vec().unwrap(),
            Some(&bias_v),
            rows,
            cin,
            cout,
        );
        for (i, (&g, &e)) in y.iter().zip(&expected).enumerate() {
            let e = e.max(0.0) as f64;
            assert!((g - e).abs() <= 1e-5, "[{i}]: {g} vs {e}");
        }
    });
}

#[test]
fn bad_shapes_are_errors() {
    with_client!(TestRuntime, |client| {
        let t = |shape: &[usize]| Tensor::<TestRuntime, f32>::full(&client, shape, 1.0).unwrap();
        let (a, b) = (t(&[4, 8]), t(&[7, 5]));
        let err = gemm(&a.view(), &b.view(), &t(&[4, 5]), &Epilogue::none()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "gemm: `b` has shape [7, 5], expected [8, 5]"
        );
        let b = t(&[8, 5]);
        let err = gemm(&a.view(), &b.view(), &t(&[5, 4]), &Epilogue::none()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "gemm: `out` has shape [5, 4], expected [4, 5]"
        );
        let bias = t(&[4]);
        let err = gemm(
            &a.view(),
            &b.view(),
            &t(&[4, 5]),
            &Epilogue::none().bias(&bias),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "gemm: `bias` has shape [4], expected [5]");
        let (a3, b3) = (t(&[2, 4, 8]), t(&[3, 8, 5]));
        let err = gemm(&a3.view(), &b3.view(), &t(&[2, 4, 5]), &Epilogue::none()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "gemm: `b` has shape [3, 8, 5], expected [2, 8, 5]"
        );
        let w = t(&[5, 8]);
        let err = gemm_with(
            GemmKernel::Registers,
            &a.view(),
            &w.view().t(),
            &t(&[4, 5]),
            &Epilogue::none(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("operand column stride = 8"),
            "{err}"
        );
        // Tensor cores are f16/bf16 only, and only where the device lists them.
        let err = gemm_with(
            GemmKernel::Cmma,
            &a.view(),
            &b.view(),
            &t(&[4, 5]),
            &Epilogue::none(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("element bytes = 4")
                && err.to_string().contains("no 16x16x16 f32 CMMA"),
            "{err}"
        );
        let e = t(&[0, 8]);
        let err = gemm(&e.view(), &b.view(), &t(&[0, 5]), &Epilogue::none()).unwrap_err();
        assert!(matches!(err, OpError::Empty { .. }), "{err}");
    });
}
