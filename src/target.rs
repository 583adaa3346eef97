//! Describing the machine latencies are measured on.

/// A stable description of this CPU: model name and the SIMD features that decide
/// kernel choice. Two machines with the same description are treated as the same
/// target.
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let flags = field("flags").unwrap_or_default();
    let wanted = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "f16c",
        "asimd",
        "sve",
    ];
    let present: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    format!(
        "{} [{}] {}",
        model,
        present.join(" "),
        std::env::consts::ARCH
    )
}
