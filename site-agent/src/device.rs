//! Where training runs: the `device` setting of `site.toml`.
//!
//! | `device` | this build without `wgpu` feature | with `--features wgpu` |
//! |---|---|---|
//! | `"cpu"`  | burn `flex` (pure-Rust CPU) | same |
//! | `"auto"` (default) | CPU | the GPU through wgpu if an adapter is found, else CPU (logged) |
//! | `"wgpu"` | error: feature not built | the GPU through wgpu, error if none |
//! | `"cuda"` | error: no CUDA backend in fedlink builds | same |
//!
//! burn's CUDA backend downloads a prebuilt LLVM at build time, so fedlink
//! does not ship it; NVIDIA GPUs are used through `wgpu` (Vulkan).

use burn::prelude::Device;
use serde::{Deserialize, Serialize};

/// The `device` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// GPU when this build has one and an adapter is present, else CPU.
    #[default]
    Auto,
    /// CPU (burn `flex`).
    Cpu,
    /// CUDA: not available in fedlink builds (see module docs).
    Cuda,
    /// GPU through wgpu (Vulkan, Metal, DX12); needs the `wgpu` feature.
    Wgpu,
}

/// Why the requested device is unavailable.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// `device = "cuda"` was asked for.
    #[error(
        "device = \"cuda\": this fedlink-agent build has no CUDA backend (burn's CUDA build \
         downloads LLVM, which fedlink does not ship). Use device = \"wgpu\" (Vulkan) on NVIDIA \
         GPUs, with an agent built with `--features wgpu`, or device = \"cpu\""
    )]
    CudaUnavailable,
    /// `device = "wgpu"` on a build without the `wgpu` feature.
    #[error(
        "device = \"wgpu\": this fedlink-agent was built without the `wgpu` feature; rebuild \
         with `cargo build --features wgpu` or use device = \"cpu\""
    )]
    WgpuNotBuilt,
    /// wgpu found no usable adapter.
    #[error("device = \"wgpu\": no usable GPU adapter: {0}")]
    NoAdapter(String),
}

/// The resolved device and a human-readable name for logs.
#[derive(Clone, Debug)]
pub struct SelectedDevice {
    /// The burn device (plain; training adds autodiff itself).
    pub device: Device,
    /// `"cpu (flex)"` or `"gpu (wgpu)"`.
    pub name: &'static str,
}

impl DeviceChoice {
    /// Resolve the choice to a burn device. `Auto` never fails: without a
    /// GPU it logs the fallback and returns the CPU.
    pub fn resolve(self) -> Result<SelectedDevice, DeviceError> {
        match self {
            Self::Cpu => Ok(cpu()),
            Self::Cuda => Err(DeviceError::CudaUnavailable),
            Self::Wgpu => gpu(),
            Self::Auto => match gpu() {
                Ok(d) => Ok(d),
                Err(e) => {
                    tracing::info!(reason = %e, "device = \"auto\": no GPU, training on the CPU");
                    Ok(cpu())
                }
            },
        }
    }
}

fn cpu() -> SelectedDevice {
    SelectedDevice {
        device: Device::flex(),
        name: "cpu (flex)",
    }
}

#[cfg(not(feature = "wgpu"))]
fn gpu() -> Result<SelectedDevice, DeviceError> {
    Err(DeviceError::WgpuNotBuilt)
}

#[cfg(feature = "wgpu")]
fn gpu() -> Result<SelectedDevice, DeviceError> {
    use std::sync::OnceLock;
    // burn's wgpu runtime initialises once per process; remember the answer.
    static WGPU: OnceLock<Result<Device, String>> = OnceLock::new();
    WGPU.get_or_init(|| Device::wgpu_options().init().map_err(|e| e.to_string()))
        .clone()
        .map(|device| SelectedDevice {
            device,
            name: "gpu (wgpu)",
        })
        .map_err(DeviceError::NoAdapter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_site_toml_values() {
        #[derive(Deserialize)]
        struct Site {
            device: DeviceChoice,
        }
        for (text, want) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda),
            ("wgpu", DeviceChoice::Wgpu),
        ] {
            let s: Site = toml::from_str(&format!("device = \"{text}\"")).unwrap();
            assert_eq!(s.device, want);
        }
        assert!(toml::from_str::<Site>("device = \"tpu\"").is_err());
        assert_eq!(DeviceChoice::default(), DeviceChoice::Auto);
    }

    #[test]
    fn cpu_and_cuda_resolve_as_documented() {
        assert_eq!(DeviceChoice::Cpu.resolve().unwrap().name, "cpu (flex)");
        let err = DeviceChoice::Cuda.resolve().unwrap_err();
        assert_eq!(err, DeviceError::CudaUnavailable);
        assert!(err.to_string().contains("wgpu"));
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn without_wgpu_auto_is_cpu_and_wgpu_is_an_error() {
        assert_eq!(DeviceChoice::Auto.resolve().unwrap().name, "cpu (flex)");
        assert_eq!(
            DeviceChoice::Wgpu.resolve().unwrap_err(),
            DeviceError::WgpuNotBuilt
        );
    }
}
