//! The named device profiles the planners and the code-generation checks use stay what the
//! devices report: on lavapipe, `DeviceProfile::of` must equal `DeviceProfile::lavapipe()`
//! (all but the name), so a plan made with the named profile is the plan the tests run.

use megabyte_ops::DeviceProfile;
use megabyte_tests::{client, TestRuntime};

/// Whether the Vulkan adapter here is Mesa's lavapipe (llvmpipe), per `vulkaninfo`.
fn on_lavapipe() -> bool {
    std::process::Command::new("vulkaninfo")
        .arg("--summary")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("llvmpipe"))
        .unwrap_or(false)
}

#[test]
fn the_lavapipe_profile_is_what_lavapipe_reports() {
    let Some(client) = client::<TestRuntime>() else {
        return;
    };
    let live = DeviceProfile::of(&client);
    eprintln!("{live:#?}");
    if !cfg!(feature = "cuda") && on_lavapipe() {
        let named = DeviceProfile {
            name: live.name,
            ..DeviceProfile::lavapipe()
        };
        assert_eq!(live, named);
    } else {
        eprintln!("not on lavapipe: the named profile is not compared");
    }
}

/// Every attention plan, on every named profile, for every head dim up to 256 and every
/// kernel `Auto` can reach (self attention and decoding against a longer cache), loads with a
/// power-of-two vector that divides the head dim and every stride the call gives. (A cap of
/// the rows kernel's vector at head dim / 4 once produced a width of 3 at head dim 12.)
#[test]
fn attention_plans_load_whole_vectors() {
    use megabyte_ops::attention::{plan, AttentionCall, AttentionKernel, AttentionProblem};
    use megabyte_ops::Dtype;
    for profile in [
        DeviceProfile::lavapipe(),
        DeviceProfile::cuda_sm80(),
        DeviceProfile::cuda_sm90(),
        DeviceProfile::hip_gfx90a(),
    ] {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            for head_dim in 1..=256usize {
                for (seq, seq_k, heads) in [(37, 37, 3), (8, 8, 2), (1, 300, 4)] {
                    let width = heads * head_dim;
                    let call = AttentionCall {
                        problem: AttentionProblem {
                            batch: 2,
                            seq,
                            heads,
                            head_dim,
                            causal: true,
                        },
                        seq_k,
                        dtype,
                        aligned: vec![head_dim, width, 3 * width, seq * 3 * width],
                    };
                    let planned = plan(AttentionKernel::Auto, &call, &profile)
                        .unwrap_or_else(|e| panic!("{} d{head_dim}: {e}", profile.name));
                    let v = planned.vector();
                    assert!(
                        v.is_power_of_two() && call.aligned.iter().all(|n| n % v == 0),
                        "{} {dtype:?} d{head_dim} seq {seq}/{seq_k}: vector {v} in {planned:?}",
                        profile.name
                    );
                }
            }
        }
    }
}
