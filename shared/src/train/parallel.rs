//! Data-parallel training over the ranks of a job (`mpirun -n N finetune ...`): what a step
//! and a run share between the replicas besides the losses' statistics (those are added where
//! they are formed, `sae::loss`, `pass::objective`): the gradients, added over the ranks in
//! flat buckets; the firing masks, OR-ed; a resumed state, sent from rank 0 (which alone reads
//! the output folder); and a hash of each replica's state, which must agree on every rank
//! before a checkpoint is written. With one process every function here is the identity.

use super::dead::DeadTracker;
use super::optim::Optimizer;
use crate::error::{Error, Result};
use crate::sae::AeParams;
use crate::util::collective::{all_agree, broadcast_f32, broadcast_u64, Collective};
use crate::util::fingerprint::TensorHasher;
use crate::util::to_vec;
use candle_core::Tensor;

/// Floats per all-reduce of the gradients (32 MB): large enough that latency does not count,
/// small enough that the packing buffers stay small next to the gradients.
const BUCKET: usize = 8 << 20;

/// Replace every rank's `grads` by their sum over the ranks (in rank order, so every rank gets
/// the same bits), packed into flat buckets of at most [`BUCKET`] floats.
pub fn sum_grads(coll: &dyn Collective, grads: &mut [AeParams<Vec<f32>>]) -> Result<()> {
    if coll.size() == 1 {
        return Ok(());
    }
    let mut fields: Vec<&mut Vec<f32>> = grads.iter_mut().flat_map(|g| g.each_mut()).collect();
    let mut bucket: Vec<f32> = Vec::with_capacity(BUCKET);
    // Each field in pieces of at most a bucket; pieces fill a bucket until it is full.
    let mut pending: Vec<(usize, usize, usize)> = Vec::new(); // (field, start, len)
    let flush = |bucket: &mut Vec<f32>, pending: &mut Vec<(usize, usize, usize)>, fields: &mut [&mut Vec<f32>]| {
        coll.sum_f32(bucket)?;
        let mut at = 0;
        for (fi, start, len) in pending.drain(..) {
            fields[fi][start..start + len].copy_from_slice(&bucket[at..at + len]);
            at += len;
        }
        bucket.clear();
        Ok::<(), Error>(())
    };
    for fi in 0..fields.len() {
        let mut start = 0;
        while start < fields[fi].len() {
            let len = (fields[fi].len() - start).min(BUCKET - bucket.len());
            bucket.extend_from_slice(&fields[fi][start..start + len]);
            pending.push((fi, start, len));
            start += len;
            if bucket.len() == BUCKET {
                flush(&mut bucket, &mut pending, &mut fields)?;
            }
        }
    }
    if !bucket.is_empty() {
        flush(&mut bucket, &mut pending, &mut fields)?;
    }
    Ok(())
}

/// [`sum_grads`] of gradients on a device, through host buffers (the device's gradients out,
/// summed over the ranks, back in).
pub fn sum_device_grads(coll: &dyn Collective, grads: Vec<AeParams<Tensor>>) -> Result<Vec<AeParams<Tensor>>> {
    if coll.size() == 1 {
        return Ok(grads);
    }
    let mut host = grads.iter().map(|g| g.try_map(to_vec)).collect::<Result<Vec<_>>>()?;
    sum_grads(coll, &mut host)?;
    grads
        .iter()
        .zip(host)
        .map(|(g, h)| g.try_zip(&h, |t, v| Ok(Tensor::from_vec(v.clone(), t.shape(), t.device())?)))
        .collect()
}

/// Which features fired anywhere in the batch: each module's mask OR-ed over the ranks.
pub fn any_fired(coll: &dyn Collective, fired: Vec<Vec<bool>>) -> Result<Vec<Vec<bool>>> {
    if coll.size() == 1 {
        return Ok(fired);
    }
    let widths: Vec<usize> = fired.iter().map(Vec::len).collect();
    let mut flat: Vec<bool> = fired.into_iter().flatten().collect();
    coll.any(&mut flat)?;
    let mut rest = flat.as_slice();
    Ok(widths
        .iter()
        .map(|&w| {
            let (head, tail) = rest.split_at(w);
            rest = tail;
            head.to_vec()
        })
        .collect())
}

/// A hash of a replica's training state: parameters, optimizer moments and count, dead-feature
/// counters (the project's content digest, [`TensorHasher`], first 8 bytes). Replicas that agree
/// bit for bit have equal hashes.
pub fn replica_hash(params: &[AeParams<Vec<f32>>], opt: &Optimizer, dead: &DeadTracker) -> u64 {
    let mut h = TensorHasher::new("scae-replica-v1");
    for p in params.iter().chain(&opt.m).chain(&opt.v) {
        for (name, v) in p.named() {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            h.add_raw(name, "f32", &[v.len()], &bytes);
        }
    }
    h.add_str(&opt.t.to_string());
    for s in &dead.since {
        let bytes: Vec<u8> = s.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.add_raw("since", "u64", &[s.len()], &bytes);
    }
    let digest = h.finish();
    let hex = digest.trim_start_matches("blake3:");
    u64::from_str_radix(&hex[..16], 16).expect("a hex digest")
}

/// The replicas' common hash ([`replica_hash`]), or an error naming the step when some rank's
/// state differs from rank 0's (a checkpoint must describe every replica).
pub fn agreed_hash(
    coll: &dyn Collective,
    params: &[AeParams<Vec<f32>>],
    opt: &Optimizer,
    dead: &DeadTracker,
    step: u64,
) -> Result<u64> {
    let h = replica_hash(params, opt, dead);
    if !all_agree(coll, h)? {
        return Err(Error::Usage(format!(
            "step {step}: the {} replicas of the suite differ (state hash {h:016x} on rank {}); the ranks must run one build on one kind of CPU",
            coll.size(),
            coll.rank()
        )));
    }
    Ok(h)
}

/// Give every rank rank 0's training state after a resume (rank 0 alone read the checkpoint):
/// parameters, optimizer moments and count, dead-feature counters, step and data position.
pub fn share_state(
    coll: &dyn Collective,
    params: &mut [AeParams<Vec<f32>>],
    opt: &mut Optimizer,
    dead: &mut DeadTracker,
    position: &mut [u64; 2],
) -> Result<()> {
    if coll.size() == 1 {
        return Ok(());
    }
    for p in params.iter_mut().chain(opt.m.iter_mut()).chain(opt.v.iter_mut()) {
        for v in p.each_mut() {
            broadcast_f32(coll, 0, v)?;
        }
    }
    let mut counts = vec![opt.t, position[0], position[1]];
    broadcast_u64(coll, &mut counts)?;
    opt.t = counts[0];
    position.copy_from_slice(&counts[1..]);
    for s in dead.since.iter_mut() {
        broadcast_u64(coll, s)?;
    }
    Ok(())
}

/// Module-sharded training (`train-suite --shard-modules`): every rank gets each module's
/// parameters and Adam moments from the rank that trains it (module m on rank m mod N).
pub fn share_modules(coll: &dyn Collective, params: &mut [AeParams<Vec<f32>>], opt: &mut Optimizer) -> Result<()> {
    let n = coll.size();
    if n == 1 {
        return Ok(());
    }
    for (m, own) in params.iter_mut().enumerate() {
        let moments = opt.m.get_mut(m).into_iter().chain(opt.v.get_mut(m));
        for p in std::iter::once(own).chain(moments) {
            for v in p.each_mut() {
                broadcast_f32(coll, m % n, v)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::collective::Single;

    #[test]
    fn one_process_is_the_identity_and_the_hash_sees_every_part() {
        let p = vec![AeParams { w_enc: vec![1.0, 2.0], b_enc: vec![3.0], w_dec: vec![4.0, 5.0], b_dec: vec![6.0] }];
        let mut g = p.clone();
        sum_grads(&Single, &mut g).unwrap();
        assert_eq!(g, p);
        let fired = vec![vec![true, false], vec![false]];
        assert_eq!(any_fired(&Single, fired.clone()).unwrap(), fired);
        let opt = Optimizer::new(super::super::optim::OptimizerKind::Adam, &p);
        let dead = DeadTracker::new(1, 2, 10);
        let h = replica_hash(&p, &opt, &dead);
        let mut q = p.clone();
        q[0].b_dec[0] = 6.5;
        assert_ne!(h, replica_hash(&q, &opt, &dead));
        let mut opt2 = opt.clone();
        opt2.t = 1;
        assert_ne!(h, replica_hash(&p, &opt2, &dead));
        assert_eq!(agreed_hash(&Single, &p, &opt, &dead, 1).unwrap(), h);
    }
}
