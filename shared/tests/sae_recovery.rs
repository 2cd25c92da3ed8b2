//! TopK training recovers a planted dictionary: data are sparse non-negative combinations of
//! 64 random unit directions in 32 dimensions; after training, at least 90% of the planted
//! directions have a decoder column with cosine ≥ 0.9. A second test shows that AuxK revives
//! latents that would otherwise stay dead. Both for the host step (the CPU path) and for the
//! autograd step (`scae::train::pretrain::update_device`, the GPU path, run here on the CPU).

use candle_core::{DType, Device, Tensor, Var};
use scae::sae::init::{geometric_median, init_params};
use scae::sae::AeParams;
use scae::train::dead::DeadTracker;
use scae::train::optim::{DeviceOptimizer, Optimizer, OptimizerKind};
use scae::train::pretrain::{update_device, update_host, UpdateConfig};
use scae::util::rng::SplitMix;

const D: usize = 32;
const N_ATOMS: usize = 64;

fn atoms(rng: &mut SplitMix) -> Vec<Vec<f32>> {
    (0..N_ATOMS)
        .map(|_| {
            let v: Vec<f64> = (0..D).map(|_| rng.normal()).collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| (x / n) as f32).collect()
        })
        .collect()
}

fn sample(rng: &mut SplitMix, atoms: &[Vec<f32>], n: usize, active: usize) -> Vec<f32> {
    let mut x = vec![0f32; n * D];
    for t in 0..n {
        for _ in 0..active {
            let a = (rng.next_u64() % N_ATOMS as u64) as usize;
            let c = (1.0 + rng.uniform()) as f32;
            for j in 0..D {
                x[t * D + j] += c * atoms[a][j];
            }
        }
    }
    x
}

fn recovered(params: &AeParams<Vec<f32>>, atoms: &[Vec<f32>], f: usize) -> usize {
    let dec = &params.w_dec;
    atoms
        .iter()
        .filter(|a| {
            (0..f).any(|i| {
                let col: Vec<f32> = (0..D).map(|j| dec[j * f + i]).collect();
                let n = col.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                col.iter().zip(a.iter()).map(|(x, y)| x * y).sum::<f32>() / n >= 0.9
            })
        })
        .count()
}

fn train(
    f: usize,
    k: usize,
    steps: usize,
    auxk_alpha: f64,
    threshold: u64,
    seed: u64,
    autograd: bool,
) -> (AeParams<Vec<f32>>, usize, Vec<usize>) {
    let mut rng = SplitMix(seed);
    let atoms = atoms(&mut rng);
    let mut params = vec![init_params(D, f, &mut rng)];
    let first = sample(&mut rng, &atoms, 512, 3);
    params[0].b_dec = geometric_median(&first, D);
    let mut opt = Optimizer::new(OptimizerKind::Adam, &params);
    let mut dead = DeadTracker::new(1, f, threshold);
    let cfg = UpdateConfig { d: D, f, k, auxk_alpha, clip: Some(1.0) };
    let mut dead_hist = Vec::new();
    let vars = vec![AeParams::<Var>::from_host(&params[0], D, f, &Device::Cpu).unwrap()];
    let mut dopt = DeviceOptimizer::from_host(&opt, &vars).unwrap();
    // The host loop holds decoders decoder-major.
    scae::train::pretrain::decoders_to_major(&mut params, &mut opt, D, f, true);
    for t in 0..steps {
        let x = sample(&mut rng, &atoms, 256, 3);
        let lr = 2e-3 * scae::train::schedule::lr_factor(t as u64, steps as u64, 0.0, 0.8);
        let out = if autograd {
            let xt = Tensor::from_slice(&x, (256, D), &Device::Cpu).unwrap();
            update_device(
                &scae::util::collective::Single,
                &vars,
                &mut dopt,
                &[(xt.clone(), xt)],
                &[dead.dead(0)],
                cfg,
                lr,
                DType::F32,
            )
            .unwrap()
        } else {
            update_host(&scae::util::collective::Single, &mut params, &mut opt, &[(&x, &x)], &[dead.dead(0)], cfg, lr)
                .unwrap()
        };
        dead.update(0, 256, &out.fired[0]);
        dead_hist.push(dead.n_dead(0));
    }
    scae::train::pretrain::decoders_to_major(&mut params, &mut opt, D, f, false);
    if autograd {
        params[0] = vars[0].to_host().unwrap();
    }
    let r = recovered(&params[0], &atoms, f);
    (params.remove(0), r, dead_hist)
}

#[test]
fn training_recovers_a_planted_dictionary() {
    for autograd in [false, true] {
        let (_, r, _) = train(128, 3, 2500, 1.0 / 32.0, 256 * 50, 11, autograd);
        assert!(r as f64 >= 0.9 * N_ATOMS as f64, "autograd {autograd}: recovered {r} of {N_ATOMS} planted directions");
    }
}

#[test]
fn auxk_revives_dead_latents() {
    // As many latents as atoms and a short dead threshold: without AuxK the latents that die
    // early stay dead and their atoms are never learned; with AuxK they come back.
    let steps = 1500;
    for autograd in [false, true] {
        let (_, r_without, without) = train(64, 3, steps, 0.0, 256 * 10, 5, autograd);
        let (_, r_with, with) = train(64, 3, steps, 1.0 / 8.0, 256 * 10, 5, autograd);
        let last = |h: &[usize]| h[h.len() - 1];
        eprintln!(
            "autograd {autograd}: dead {} -> {} with AuxK; atoms {r_without} -> {r_with}",
            last(&without),
            last(&with)
        );
        assert!(last(&without) > 0, "the setting must kill latents without AuxK");
        assert!(
            last(&with) < last(&without),
            "autograd {autograd}: dead at the end: with AuxK {}, without {}",
            last(&with),
            last(&without)
        );
        assert!(r_with > r_without, "autograd {autograd}: atoms recovered: with AuxK {r_with}, without {r_without}");
    }
}
