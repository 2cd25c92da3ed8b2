//! Tests of the comparison table, the summary in words and the settling of token splits.

use super::*;

pub(crate) fn run(finetuned: bool, c: Option<u64>, random: bool, seed: &str, ce_diff: f64) -> Run {
    Run {
        dir: PathBuf::from(format!("e-{seed}-{finetuned}-{c:?}-{random}")),
        role: Role { finetuned, c, random, learned: false, embed_c: None, unembed_c: None },
        tokens: "held-out".into(),
        cache: "h".into(),
        unsure: false,
        n_tokens: 1000,
        root: seed.into(),
        seed_group: seed.into(),
        recipe: finetuned.then(|| "mse, 200 steps, lr 1e-4, batch 16".to_string()),
        recipe_flags: finetuned.then(|| serde_json::json!({"--loss": "mse", "--lr": 1e-4, "steps": 200})),
        lineage_recorded: true,
        ce_diff,
        ce_recovered: 0.9,
        mean_fvu: 0.1,
        mean_l0: 8.0,
        never_fired: 0.1,
    }
}

/// One seed: all connections a, pruned b, finetuned pruned x, all finetuned y, random r.
fn seed(s: &str, a: f64, b: f64, x: f64, y: Option<f64>, r: Option<f64>) -> Vec<Run> {
    let mut v =
        vec![run(false, None, false, s, a), run(false, Some(16), false, s, b), run(true, Some(16), false, s, x)];
    v.extend(y.map(|y| run(true, None, false, s, y)));
    v.extend(r.map(|r| run(true, Some(16), true, s, r)));
    v
}

#[test]
fn the_words_follow_the_numbers() {
    // (0.5 - 0.1) / (0.5 - 0.02) = 83%: most of the gap.
    let most = summary(&seed("s", 0.01, 0.5, 0.1, Some(0.02), Some(0.3))).unwrap();
    assert!(most.contains("closes 83% of the gap"), "{most}");
    assert!(most.contains("So: finetuning through the sparse pass closes most (83%)"), "{most}");
    assert!(most.contains("the selected connections beat random ones in every seed"), "{most}");
    assert!(most.contains("ends 0.0800 above that control"), "{most}");
    // (0.5 - 0.4) / (0.5 - 0.1) = 25%: only part of it.
    let part = summary(&seed("s", 0.01, 0.5, 0.4, Some(0.1), None)).unwrap();
    assert!(part.contains("closes only 25% of the gap") && !part.contains("most"), "{part}");
    // Below the finetuned control: it matches or beats it.
    let beat = summary(&seed("s", 0.01, 0.5, 0.05, Some(0.06), None)).unwrap();
    assert!(beat.contains("matches or beats the equally finetuned all-connections suite"), "{beat}");
    assert!(beat.contains("ends 0.0100 below that control"), "{beat}");
    // No control: the gain cannot be told from training longer, and no verdict is claimed.
    let none = summary(&seed("s", 0.01, 0.5, 0.05, None, None)).unwrap();
    assert!(none.contains("cannot be told from the gain of training longer") && !none.contains("So:"), "{none}");
    // Two seeds, random connections win in one: said, with the per-seed count.
    let mut two = seed("a", 0.01, 0.5, 0.1, Some(0.02), Some(0.3));
    two.extend(seed("b", 0.01, 0.5, 0.2, Some(0.02), Some(0.15)));
    let two = summary(&two).unwrap();
    assert!(two.contains("Selected connections beat random ones in 1 of 2 seed(s)"), "{two}");
    assert!(two.contains("beat random ones in only 1 of 2 seed(s)"), "{two}");
    assert!(two.contains("0.1500 (0.1000–0.2000)"), "{two}");
    // A control finetuned another way (any flag, here AuxK) is called out.
    let mut other = seed("s", 0.01, 0.5, 0.1, Some(0.02), None);
    other[3].recipe_flags = Some(serde_json::json!({"--loss": "mse", "--lr": 1e-4, "steps": 200, "--auxk-alpha": 0.5}));
    let other = summary(&other).unwrap();
    assert!(other.contains("Caution: the all-connections control was not finetuned the same way"), "{other}");
    assert!(other.contains("all connections, finetuned another way (see below) (the control)"), "{other}");
    // One seed below the mean's band is named, with its share.
    let mut mixed = seed("a", 0.01, 0.5, 0.05, Some(0.02), None);
    mixed.extend(seed("b", 0.01, 0.5, 0.3, Some(0.02), None));
    let mixed = summary(&mixed).unwrap();
    assert!(mixed.contains("but not in every seed (gap closed per seed: 94%, 42%)"), "{mixed}");
}

/// One pretrained suite finetuned with several seeds: the unfinetuned runs are shared, the
/// finetuned ones count as separate seeds.
#[test]
fn finetuning_seeds_of_one_suite_are_seeds() {
    let mut runs = seed("root", 0.01, 0.5, 0.1, Some(0.02), None);
    for r in runs.iter_mut().filter(|r| r.role.finetuned) {
        r.seed_group = "root/seed 0".into();
    }
    let second: Vec<Run> = runs
        .iter()
        .filter(|r| r.role.finetuned)
        .map(|r| {
            let mut r = r.clone();
            r.seed_group = "root/seed 1".into();
            r.dir = PathBuf::from(format!("{}-1", r.dir.display()));
            r.ce_diff += 0.02;
            r
        })
        .collect();
    runs.extend(second);
    let s = summary(&runs).unwrap();
    assert!(s.contains("over 2 seeds") && s.contains("across seeds"), "{s}");
    assert!(!table(&runs).contains("warning:"));
    // The same folder twice is a duplicate, and said.
    let mut dup = runs.clone();
    dup.push(runs[2].clone());
    assert!(table(&dup).contains("warning: these runs share a role, split and seed"));
}

#[test]
fn a_suite_without_lineage_joins_its_caches_split() {
    let mut runs = seed("s", 0.01, 0.5, 0.1, Some(0.02), None);
    for r in &mut runs[..2] {
        r.tokens = "unknown".into();
        r.lineage_recorded = false;
    }
    assert_eq!(settle_splits(&mut runs), 2);
    assert!(runs.iter().all(|r| r.tokens == "held-out"));
    assert!(table(&runs).contains("2 run(s) marked *"));
    // Unknown for another reason (a missing data fingerprint): its own column.
    let mut runs = seed("s", 0.01, 0.5, 0.1, Some(0.02), None);
    runs[0].tokens = "unknown".into();
    assert_eq!(settle_splits(&mut runs), 0);
    assert_eq!(runs[0].tokens, "unknown");
}

/// Learned connections are their own role: labelled `learned C`, ordered after the top C, and
/// the summary names them and still finds its random control.
#[test]
fn learned_connections_are_their_own_role() {
    let mut runs = seed("0", 0.01, 0.5, 0.02, Some(0.005), Some(0.1));
    for r in runs.iter_mut().filter(|r| r.role.c == Some(16) && !r.role.random) {
        r.role.learned = true;
    }
    runs.push(run(true, Some(16), false, "0", 0.03));
    let labels: Vec<String> = roles(&runs).iter().map(|r| r.connections()).collect();
    assert!(labels.contains(&"learned 16".to_string()) && labels.contains(&"top 16".to_string()), "{labels:?}");
    let text = summary(&runs).unwrap();
    assert!(text.contains("connections learned by learn-connections") && text.contains("random C=16"), "{text}");
}
