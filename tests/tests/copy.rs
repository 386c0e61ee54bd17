//! The strided copy between views against a host loop: exact, since it moves bits. Covers the
//! two uses of the model (appending K/V rows to a cache, picking one position out of a batch),
//! random views, and errors.

use megabyte_ops::copy::copy;
use megabyte_ops::{OpError, Tensor};
use megabyte_tests::{assert_unsupported, uniform, with_client, TestRuntime};
use proptest::prelude::*;

/// Copies the (b, s, c) window at (0, s0, c0) of a (b, S, C) source into the window at
/// (0, d0, e0) of a (b, S2, C2) destination, and compares every destination element (the
/// untouched ones must keep their NaN poison).
#[allow(clippy::too_many_arguments)]
fn run_case(
    b: usize,
    s: usize,
    c: usize,
    src_dims: (usize, usize),
    src_at: (usize, usize),
    dst_dims: (usize, usize),
    dst_at: (usize, usize),
    seed: u64,
) {
    let case = format!("copy(b={b}, s={s}, c={c}, src={src_dims:?}@{src_at:?}, dst={dst_dims:?}@{dst_at:?}, seed={seed})");
    with_client!(TestRuntime, |client| {
        let (ss, sc) = src_dims;
        let (ds, dc) = dst_dims;
        let src = uniform(seed, b * ss * sc, -1.0, 1.0);
        let st = Tensor::<TestRuntime, f32>::from_f32(&client, &src, &[b, ss, sc]).unwrap();
        let dt = Tensor::<TestRuntime, f32>::full(&client, &[b, ds, dc], f64::NAN).unwrap();
        let sv = st
            .strided(src_at.0 * sc + src_at.1, &[b, s, c], &[ss * sc, sc, 1])
            .unwrap();
        let dv = dt
            .strided(dst_at.0 * dc + dst_at.1, &[b, s, c], &[ds * dc, dc, 1])
            .unwrap();
        copy(&sv, &dv).unwrap();
        let got = dt.to_vec().unwrap();
        for bi in 0..b {
            for i in 0..ds {
                for j in 0..dc {
                    let inside = (dst_at.0..dst_at.0 + s).contains(&i)
                        && (dst_at.1..dst_at.1 + c).contains(&j);
                    let g = got[(bi * ds + i) * dc + j];
                    if inside {
                        let want =
                            src[(bi * ss + i - dst_at.0 + src_at.0) * sc + j - dst_at.1 + src_at.1];
                        assert_eq!(g.to_bits(), want.to_bits(), "{case}: dst[{bi}, {i}, {j}]");
                    } else {
                        assert!(
                            g.is_nan(),
                            "{case}: dst[{bi}, {i}, {j}] outside the window was written"
                        );
                    }
                }
            }
        }
    });
}

#[test]
fn model_uses() {
    // K and V of one new position out of a fused (B, 1, 3C) projection into slot 5 of a
    // (B, 8, C) cache; one position (3) of a (B, P, C) batch into a (B, 1, C) row.
    run_case(3, 1, 64, (1, 192), (0, 64), (8, 64), (5, 0), 1);
    run_case(3, 1, 64, (1, 192), (0, 128), (8, 64), (5, 0), 2);
    run_case(2, 1, 48, (8, 48), (3, 0), (1, 48), (0, 0), 3);
    // Several rows at once (a prefill into the cache) and odd widths that defeat vectorising.
    run_case(2, 7, 33, (7, 99), (0, 33), (20, 33), (4, 0), 4);
    run_case(1, 1, 1, (1, 1), (0, 0), (1, 1), (0, 0), 5);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_windows(b in 1usize..4, s in 1usize..9, c in 1usize..40, extra in (0usize..4, 0usize..9, 0usize..4, 0usize..9), at in (0usize..4, 0usize..9, 0usize..4, 0usize..9), seed: u64) {
        let src_dims = (s + extra.0, c + extra.1);
        let dst_dims = (s + extra.2, c + extra.3);
        let src_at = (at.0 % (extra.0 + 1), at.1 % (extra.1 + 1));
        let dst_at = (at.2 % (extra.2 + 1), at.3 % (extra.3 + 1));
        run_case(b, s, c, src_dims, src_at, dst_dims, dst_at, seed);
    }
}

#[test]
fn bad_views_are_errors() {
    with_client!(TestRuntime, |client| {
        let t = Tensor::<TestRuntime, f32>::full(&client, &[4, 6], 0.0).unwrap();
        let a = t.strided(0, &[2, 3], &[6, 1]).unwrap();
        let wrong = t.strided(0, &[3, 2], &[6, 1]).unwrap();
        let err = copy(&a, &wrong).unwrap_err();
        assert_eq!(
            err.to_string(),
            "copy: `dst` has shape [3, 2], expected [2, 3]"
        );
        let transposed = t.strided(0, &[2, 3], &[1, 6]).unwrap();
        let err = copy(&a, &transposed).unwrap_err();
        assert_unsupported(&err, "last-dimension stride", 6);
        let empty = t.strided(0, &[0, 3], &[6, 1]).unwrap();
        let err = copy(&empty, &empty).unwrap_err();
        assert!(matches!(err, OpError::Empty { .. }), "{err}");
    });
}
