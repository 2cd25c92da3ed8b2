//! Collectives over the processes of one job: the ranks a launcher (`mpirun`, `srun`) started.
//!
//! [`Collective`] is what a stage needs from its peers — sums of host buffers, an OR of flags,
//! a broadcast from rank 0, a barrier — with two implementations: [`Single`] (one process, every
//! operation the identity) and, with the cargo feature `mpi`, `Mpi` over the `mpi` crate
//! (OpenMPI or MPICH). Sums are reduce-scatter + all-gather with each element added in rank
//! order, so every rank holds the same bits whatever reduction algorithm the MPI library would
//! pick, over any transport.
//!
//! [`launched_ranks`] reads the launcher's environment; [`init`] returns the collective for
//! this process and refuses, with a one-line hint, a build without MPI that finds itself
//! launched as one of several ranks (N copies would otherwise write one output).

use crate::error::{Error, Result};

/// Whether this build has the MPI collectives (the cargo feature `mpi`).
pub const WITH_MPI: bool = cfg!(feature = "mpi");

/// What a stage needs from the other ranks of its job.
pub trait Collective {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replace `buf` on every rank by the element-wise sum over ranks, added in rank order.
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// As [`sum_f64`](Self::sum_f64), for f32 buffers (added in f32, in rank order).
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Replace `flags` on every rank by the element-wise OR over ranks.
    fn any(&self, flags: &mut [bool]) -> Result<()>;
    /// Replace `bytes` on every rank by rank `root`'s.
    fn broadcast_from(&self, root: usize, bytes: &mut Vec<u8>) -> Result<()>;
    /// Move rank `from`'s `bytes` to rank 0 (which must call this with the same `from`; its
    /// `bytes` are replaced); other ranks do nothing. Messages arrive in the order sent.
    fn send_to_root(&self, from: usize, bytes: &mut Vec<u8>) -> Result<()>;
    /// Replace `bytes` on every rank by rank 0's.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        self.broadcast_from(0, bytes)
    }
    /// Wait until every rank gets here.
    fn barrier(&self) -> Result<()>;
    /// End the whole job now with exit status `code` (a rank that failed must not leave the
    /// others waiting in a collective).
    fn abort(&self, code: i32) -> !;
}

/// The rows `start..start + len` of a batch of `total` rows that this rank computes in a
/// data-parallel step: equal slices in rank order, so the same command gives the same run on
/// any number of ranks. `what` names the batch in the error when `total` does not divide.
pub fn my_slice(coll: &dyn Collective, total: usize, what: &str) -> Result<(usize, usize)> {
    let n = coll.size();
    if !total.is_multiple_of(n) {
        return Err(Error::Usage(format!(
            "{what} {total} does not divide among {n} ranks; hint: use a multiple of {n}, or launch {} ranks",
            (1..=n).rev().find(|k| total.is_multiple_of(*k)).unwrap_or(1)
        )));
    }
    let len = total / n;
    Ok((coll.rank() * len, len))
}

/// Replace `values` on every rank by rank `root`'s (f32, bit for bit).
pub fn broadcast_f32(coll: &dyn Collective, root: usize, values: &mut Vec<f32>) -> Result<()> {
    if coll.size() == 1 {
        return Ok(());
    }
    let mut bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    coll.broadcast_from(root, &mut bytes)?;
    *values = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(())
}

/// Replace `values` on every rank by rank 0's.
pub fn broadcast_u64(coll: &dyn Collective, values: &mut Vec<u64>) -> Result<()> {
    if coll.size() == 1 {
        return Ok(());
    }
    let mut bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    coll.broadcast(&mut bytes)?;
    *values = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    Ok(())
}

/// Whether every rank holds the same `value` (e.g. a hash of its replica of the parameters).
pub fn all_agree(coll: &dyn Collective, value: u64) -> Result<bool> {
    let mut root = vec![value];
    broadcast_u64(coll, &mut root)?;
    let mut differs = [root[0] != value];
    coll.any(&mut differs)?;
    Ok(!differs[0])
}

/// One process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn any(&self, _: &mut [bool]) -> Result<()> {
        Ok(())
    }
    fn broadcast_from(&self, _: usize, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn send_to_root(&self, _: usize, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// How a launcher tells a process its place in a job: the size and rank variables of OpenMPI,
/// of PMI (MPICH, Intel MPI, `srun --mpi=pmi2`) and of a Slurm job step (`srun`; not
/// `SLURM_NTASKS`, which every process of a multi-task allocation sees, including a lone
/// process started without `srun`).
const LAUNCHERS: [(&str, &str); 3] = [
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("PMI_SIZE", "PMI_RANK"),
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
];

/// A process's place in a multi-rank job, as its launcher's environment states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub size: usize,
    /// The variable that said so (`OMPI_COMM_WORLD_SIZE=2`).
    pub how: String,
}

/// The job this process was launched in, when the environment `var` names more than one rank
/// (`var` reads a variable, so tests can pass their own environment).
pub fn launched_ranks(var: impl Fn(&str) -> Option<String>) -> Option<Launch> {
    LAUNCHERS.iter().find_map(|(size_var, rank_var)| {
        let size: usize = var(size_var)?.trim().parse().ok()?;
        let rank = var(rank_var).and_then(|r| r.trim().parse().ok()).unwrap_or(0);
        (size > 1).then(|| Launch { rank, size, how: format!("{size_var}={size}") })
    })
}

/// The GPU a rank of a multi-rank job takes with `--device cuda`: its rank among the ranks on
/// its node (OpenMPI's `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`, Slurm's
/// `SLURM_LOCALID`), so that `mpirun -n 8 finetune --device cuda` on an 8-GPU node puts one rank
/// on each GPU; 0 for one process.
pub fn local_gpu(var: impl Fn(&str) -> Option<String>) -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| var(k).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// The collective of this process: `Mpi` when built with the feature `mpi` and launched as
/// several ranks, else [`Single`]. A build without MPI launched as several ranks is refused.
pub fn init() -> Result<Box<dyn Collective>> {
    match launched_ranks(|v| std::env::var(v).ok()) {
        None => Ok(Box::new(Single)),
        Some(launch) => multi(launch),
    }
}

/// Refuse to run a stage that has no multi-rank form when this process is one of several
/// ranks: each would run the whole job alone and write the same output.
pub fn require_one_process(tool: &str) -> Result<()> {
    match launched_ranks(|v| std::env::var(v).ok()) {
        None => Ok(()),
        Some(launch) if !cfg!(feature = "mpi") => Err(no_mpi(&launch)),
        Some(launch) => Err(Error::Usage(format!(
            "launched as rank {} of {} ({}), but {tool} runs as one process; hint: run it without mpirun/srun",
            launch.rank, launch.size, launch.how
        ))),
    }
}

fn no_mpi(launch: &Launch) -> Error {
    Error::Usage(format!(
        "launched as rank {} of {} ({}), but this build has no MPI support, so each rank would run the whole job alone; hint: build with `make build MPI=1`, or run one process without mpirun/srun",
        launch.rank, launch.size, launch.how
    ))
}

#[cfg(not(feature = "mpi"))]
fn multi(launch: Launch) -> Result<Box<dyn Collective>> {
    Err(no_mpi(&launch))
}

#[cfg(feature = "mpi")]
fn multi(launch: Launch) -> Result<Box<dyn Collective>> {
    let comm = mpi_backend::Mpi::init()?;
    if comm.size() != launch.size {
        return Err(Error::Usage(format!(
            "{} says {} ranks, but MPI counts {}; hint: launch with the mpirun of the MPI this build links",
            launch.how,
            launch.size,
            comm.size()
        )));
    }
    Ok(Box::new(comm))
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    //! [`Collective`](super::Collective) over MPI's world communicator.

    use mpi::collective::SystemOperation;
    use mpi::datatype::{Partition, PartitionMut};
    use mpi::traits::{Communicator, CommunicatorCollectives, Destination, Root, Source};
    use mpi::Count;

    use crate::error::{Error, Result};

    /// The world communicator of an initialised MPI (finalised when dropped).
    pub struct Mpi {
        _universe: mpi::environment::Universe,
        world: mpi::topology::SimpleCommunicator,
    }

    impl Mpi {
        /// Initialise MPI (once per process).
        pub fn init() -> Result<Mpi> {
            let universe =
                mpi::initialize().ok_or_else(|| Error::Usage("MPI was initialised twice in one process".into()))?;
            let world = universe.world();
            Ok(Mpi { _universe: universe, world })
        }

        /// Replace `buf` on every rank by the sum over ranks, each element added in rank order
        /// with `add`: reduce-scatter, then all-gather. The buffer is cut into one segment per
        /// rank; every rank sends each segment to its owner (all-to-all), each owner adds the
        /// pieces of its segment in rank order, and the sums are gathered by all. Each rank
        /// sends and receives about 2·(N−1)/N of the buffer (the bandwidth-optimal volume;
        /// gathering on one rank made that rank move N times the buffer), and every element is `((x_0 + x_1) + x_2) + ...` whichever
        /// rank adds it, so every rank and every run get the same bits.
        fn sum_in_rank_order<T>(&self, buf: &mut [T], add: impl Fn(&mut T, &T)) -> Result<()>
        where
            T: mpi::datatype::Equivalence + Copy + Default,
        {
            let (p, r, n) = (self.world.size() as usize, self.world.rank() as usize, buf.len());
            if n > i32::MAX as usize {
                return Err(Error::Usage(format!("an all-reduce of {n} values: above MPI's count limit")));
            }
            let start = |j: usize| j * (n / p) + j.min(n % p);
            let counts: Vec<Count> = (0..p).map(|j| (start(j + 1) - start(j)) as Count).collect();
            let displs: Vec<Count> = (0..p).map(|j| start(j) as Count).collect();
            let mine = counts[r] as usize;
            let mut pieces = vec![T::default(); mine * p];
            {
                let send = Partition::new(&buf[..], &counts[..], &displs[..]);
                let recv_counts = vec![mine as Count; p];
                let recv_displs: Vec<Count> = (0..p).map(|i| (i * mine) as Count).collect();
                let mut recv = PartitionMut::new(&mut pieces[..], &recv_counts[..], &recv_displs[..]);
                self.world.all_to_all_varcount_into(&send, &mut recv);
            }
            let (sum, rest) = pieces.split_at_mut(mine);
            for piece in rest.chunks_exact(mine.max(1)) {
                sum.iter_mut().zip(piece).for_each(|(a, b)| add(a, b));
            }
            let mut all = PartitionMut::new(buf, &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(&sum[..], &mut all);
            Ok(())
        }
    }

    impl super::Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            self.sum_in_rank_order(buf, |a, b| *a += b)
        }
        fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            self.sum_in_rank_order(buf, |a, b| *a += b)
        }
        fn any(&self, flags: &mut [bool]) -> Result<()> {
            let mine: Vec<u8> = flags.iter().map(|&f| f as u8).collect();
            let mut all = vec![0u8; mine.len()];
            self.world.all_reduce_into(&mine[..], &mut all[..], SystemOperation::max());
            flags.iter_mut().zip(all).for_each(|(f, x)| *f = x != 0);
            Ok(())
        }
        fn broadcast_from(&self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
            let root = self.world.process_at_rank(root as i32);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            self.world.barrier();
            Ok(())
        }
        fn send_to_root(&self, from: usize, bytes: &mut Vec<u8>) -> Result<()> {
            // In pieces of at most 1 GiB (MPI counts are 32-bit), after the length.
            const PIECE: usize = 1 << 30;
            let (me, from) = (self.world.rank() as usize, from);
            if from == 0 || (me != 0 && me != from) {
                return Ok(());
            }
            if me == from {
                let root = self.world.process_at_rank(0);
                root.send(&(bytes.len() as u64));
                for piece in bytes.chunks(PIECE) {
                    root.send(piece);
                }
                return Ok(());
            }
            let src = self.world.process_at_rank(from as i32);
            let (len, _) = src.receive::<u64>();
            bytes.clear();
            while bytes.len() < len as usize {
                let (piece, _) = src.receive_vec::<u8>();
                bytes.extend_from_slice(&piece);
            }
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launchers_are_read_and_a_lone_process_in_an_allocation_is_not_a_rank() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let got = launched_ranks(env(&[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1")]));
        assert_eq!(got, Some(Launch { rank: 1, size: 2, how: "OMPI_COMM_WORLD_SIZE=2".into() }));
        let got = launched_ranks(env(&[("PMI_SIZE", "4"), ("PMI_RANK", "3")])).unwrap();
        assert_eq!((got.rank, got.size), (3, 4));
        let got = launched_ranks(env(&[("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_PROCID", "5")])).unwrap();
        assert_eq!((got.rank, got.size), (5, 8));
        assert_eq!(launched_ranks(env(&[("SLURM_NTASKS", "8")])), None, "an allocation is not a job step");
        assert_eq!(launched_ranks(env(&[("OMPI_COMM_WORLD_SIZE", "1")])), None, "one rank runs as one process");
        assert_eq!(launched_ranks(env(&[])), None);
    }

    #[test]
    fn each_rank_on_a_node_takes_its_own_gpu() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(local_gpu(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])), 3);
        assert_eq!(local_gpu(env(&[("SLURM_LOCALID", "5")])), 5);
        assert_eq!(local_gpu(env(&[("MPI_LOCALRANKID", "1")])), 1);
        assert_eq!(local_gpu(env(&[])), 0);
    }

    #[test]
    fn one_process_collectives_are_the_identity() {
        let c = Single;
        let (mut a, mut b, mut f, mut bytes) = (vec![1.5f64, -2.0], vec![3f32], vec![true, false], vec![7u8, 8]);
        c.sum_f64(&mut a).unwrap();
        c.sum_f32(&mut b).unwrap();
        c.any(&mut f).unwrap();
        c.broadcast(&mut bytes).unwrap();
        c.barrier().unwrap();
        assert_eq!(
            (a, b, f, bytes, c.rank(), c.size()),
            (vec![1.5, -2.0], vec![3.0], vec![true, false], vec![7, 8], 0, 1)
        );
    }
}
