//! The MPI collectives (feature `mpi`) on two ranks: the test starts itself under
//! `mpirun -n 2`, each rank checks the sums, OR and broadcast, and the launch must succeed.
//! Without an `mpirun` on the PATH it says SKIPPED.
#![cfg(feature = "mpi")]

use scae::util::collective::{init, Collective};

/// The checks each rank runs (as a child of mpirun).
fn as_rank() {
    let c: Box<dyn Collective> = init().expect("MPI initialises");
    let (r, n) = (c.rank(), c.size());
    assert_eq!(n, 2);
    // Values whose f32 sum depends on the order: rank order is the contract.
    let mut a = vec![r as f64 + 0.5, 1e16, -(r as f64)];
    c.sum_f64(&mut a).unwrap();
    assert_eq!(a, vec![2.0, 2e16, -1.0]);
    let mut b = vec![if r == 0 { 1.0f32 } else { 1e-8 }, 3.0];
    c.sum_f32(&mut b).unwrap();
    assert_eq!(b, vec![1.0f32 + 1e-8, 6.0]);
    let mut f = vec![r == 1, false];
    c.any(&mut f).unwrap();
    assert_eq!(f, vec![true, false]);
    let mut bytes = if r == 0 { b"rank zero".to_vec() } else { Vec::new() };
    c.broadcast(&mut bytes).unwrap();
    assert_eq!(bytes, b"rank zero");
    let mut bytes = if r == 1 { b"from rank one".to_vec() } else { b"x".to_vec() };
    c.broadcast_from(1, &mut bytes).unwrap();
    assert_eq!(bytes, b"from rank one");
    let mut msg = if r == 1 { vec![7u8; 3000] } else { Vec::new() };
    c.send_to_root(1, &mut msg).unwrap();
    assert_eq!(msg, vec![7u8; 3000], "rank {r}: rank 1's message reached rank 0 and stayed on rank 1");
    assert!(scae::util::collective::all_agree(c.as_ref(), 7).unwrap());
    assert!(!scae::util::collective::all_agree(c.as_ref(), r as u64).unwrap());
    c.barrier().unwrap();
}

#[test]
fn collectives_over_two_mpi_ranks() {
    if std::env::var("OMPI_COMM_WORLD_SIZE").is_ok() || std::env::var("PMI_SIZE").is_ok() {
        return as_rank();
    }
    let Ok(mpirun) = which("mpirun") else {
        eprintln!("SKIPPED: no mpirun on the PATH");
        return;
    };
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(mpirun)
        .args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", "2"])
        .arg(&exe)
        .args(["collectives_over_two_mpi_ranks", "--exact", "--test-threads", "1"])
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .output()
        .expect("mpirun starts");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "mpirun -n 2 failed:\n{text}");
    assert_eq!(text.matches("1 passed").count(), 2, "both ranks ran the checks:\n{text}");
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).ok_or(())
}
