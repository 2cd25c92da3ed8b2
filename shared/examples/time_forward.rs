//! Time the pieces of one forward pass (development aid): `cargo run --release --example
//! time_forward -- MODEL_DIR [batch] [ctx]`.
use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let b: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(16);
    let s: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(128);
    let t = Instant::now();
    let model = scae::model::Model::load("m", &dir, &Device::Cpu)?;
    eprintln!("load {:.3}s", t.elapsed().as_secs_f64());
    let v = model.cfg().d_vocab as u32;
    let toks: Vec<u32> = (0..b * s).map(|i| (i as u32 * 7919) % v).collect();
    let tokens = Tensor::from_vec(toks, (b, s), &Device::Cpu)?;
    for _ in 0..2 {
        let t = Instant::now();
        let out = model.runtime.forward(&tokens, true, false)?;
        let full = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let resid = out.resid_pre0.clone();
        let _ = model.runtime.ce_from_resid(&resid, &tokens)?;
        let ce = t.elapsed().as_secs_f64();
        eprintln!("forward {full:.3}s (of which CE ~{ce:.3}s), {:.0} tok/s", (b * s) as f64 / full);
    }
    Ok(())
}
