//! Chaperone's eBPF programs. Built only for `bpfel-unknown-none` (see
//! `interceptor/build.rs`); on the host this binary is an explanation.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "interceptor-ebpf holds eBPF programs for the bpfel-unknown-none target; \
         `cargo build -p chaperone` builds and embeds them"
    );
}
