//! CUDA device discovery through cudarc's driver API (`megabyte::cuda::devices`): where a
//! driver and a device answer, every device has a name, a compute capability a CUDA 12 driver
//! supports and some memory; elsewhere the reason is one line. Never a panic.
#![cfg(feature = "cuda-codegen")]

#[test]
fn discovery_lists_devices_or_gives_one_line_of_reason() {
    match megabyte::cuda::devices() {
        Ok(devices) => {
            assert!(!devices.is_empty());
            for (i, d) in devices.iter().enumerate() {
                assert_eq!(d.ordinal, i);
                assert!(!d.name.is_empty(), "{d:?}");
                assert!(d.compute_capability.0 >= 5, "{d:?}");
                assert!(d.memory_bytes > 0, "{d:?}");
                assert!(d.to_string().starts_with(&format!("cuda:{i} ")), "{d}");
            }
        }
        Err(reason) => {
            assert!(!reason.is_empty() && !reason.contains('\n'), "{reason:?}");
        }
    }
}
