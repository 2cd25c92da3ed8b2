//! Time `Collective::sum_f32` on one buffer (the size of a step's gradients), for the note on
//! data-parallel cost. Run under MPI, e.g. for TinyStories-33M's shape (8 modules of
//! F 3072 × d_model 768: 37,779,456 floats):
//!
//!     cargo build --release -p scae --features mpi --example collective_bench
//!     mpirun --allow-run-as-root --oversubscribe --bind-to none -n 2 \
//!         target/release/examples/collective_bench 37779456 5
use scae::util::collective::init;

fn main() -> scae::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    let reps: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let c = init()?;
    let mut buf: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3 + c.rank() as f32).collect();
    c.sum_f32(&mut buf)?; // warm-up
    c.barrier()?;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        c.sum_f32(&mut buf)?;
    }
    c.barrier()?;
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    if c.rank() == 0 {
        let mb = (n * 4) as f64 / 1e6;
        println!("ranks {} floats {n} ({mb:.1} MB): {secs:.3} s per sum ({:.0} MB/s of buffer)", c.size(), mb / secs);
    }
    Ok(())
}
