//! With the `cuda` feature, compiles the op kernels (`src/ops/*.cu`) to PTX with nvcc; the ops
//! load it at run time. CPU builds need no CUDA toolchain and skip this.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &[
    "adamw",
    "attention",
    "ce",
    "embedding",
    "heads",
    "kl",
    "norm",
    "swiglu",
];

fn main() {
    for k in KERNELS {
        println!("cargo:rerun-if-changed=src/ops/{k}.cu");
    }
    println!("cargo:rerun-if-changed=src/ops/lse.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // PTX for the oldest architecture the kernels need (mma.sync bf16, ldmatrix, cp.async:
    // sm_80); the driver compiles it for the GPU it runs on.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    for k in KERNELS {
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(format!("src/ops/{k}.cu"))
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e} (set CUDA_HOME or PATH)", nvcc.display()));
        assert!(status.success(), "nvcc failed on src/ops/{k}.cu");
    }
}
