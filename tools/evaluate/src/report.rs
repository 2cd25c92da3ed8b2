//! `evaluate --compare`: several evaluation runs side by side — a markdown table (held-out and
//! training-token numbers in their own columns; runs of several seeds in one row as mean and
//! range), what they say in words (every sentence computed from the numbers it states), and a
//! plot (`plot.rs`, which reads this file's runs). [`compare`] loads the runs and writes the table
//! and verdicts (the tool then draws the plot); the tests are in `report/tests.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use scae::formats::edges_meta::{EdgesMeta, Key};
use scae::formats::eval_json::EvalReport;

/// `evaluate --compare`: load the runs in `dirs` (a folder named twice counts once) and write
/// `compare.md` (table and summary) into `out`; returns its text and the runs (the tool draws
/// `compare.png` and `.svg` from them with `plot::plot`).
pub fn compare(dirs: &[PathBuf], out: &Path) -> Result<(String, Vec<Run>)> {
    // A folder named twice (the same suite's evaluation in several seeds' lists) counts once.
    let mut unique: Vec<&PathBuf> = Vec::new();
    for d in dirs {
        let same = |e: &&PathBuf| e.canonicalize().ok().is_some_and(|c| Some(c) == d.canonicalize().ok());
        if !unique.iter().any(|e| same(e) || *e == d) {
            unique.push(d);
        }
    }
    let mut runs = unique.iter().map(|d| load_run(d)).collect::<Result<Vec<_>>>()?;
    settle_splits(&mut runs);
    let md = table(&runs);
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("{}: --out: cannot create output folder: {e}", out.display()))?;
    let text = match summary(&runs) {
        Some(s) => format!("{md}\n{s}"),
        None => md,
    };
    scae::util::io::write_atomic(&out.join("compare.md"), text.as_bytes())?;
    Ok((text, runs))
}

/// One evaluation run (an `evaluate --out` folder).
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub role: Role,
    /// `held-out`, `training` or `unknown` (after [`settle_splits`]: for the run's cache).
    pub tokens: String,
    /// The evaluated cache (its identity, else its path).
    pub cache: String,
    /// The run's own suite cannot tell whether it saw these tokens (no recorded lineage), but
    /// other suites evaluated on the same cache can.
    pub unsure: bool,
    pub n_tokens: u64,
    /// The pretrained suite the run's suite descends from.
    pub root: String,
    /// One seed of the comparison: the pretrained suite, and for a finetuned suite its
    /// finetuning `--seed` too (runs from one fixed suite finetuned with several seeds).
    pub seed_group: String,
    /// How the suite was finetuned (loss, steps, lr, batch size), when it was.
    pub recipe: Option<String>,
    /// Every flag of that finetuning but those that differ between the runs of a comparison
    /// (`--connections`, `--suite`, `--seed`): equal for runs finetuned the same way.
    pub recipe_flags: Option<serde_json::Value>,
    /// The suite records the data it was trained on.
    pub lineage_recorded: bool,
    pub ce_diff: f64,
    pub ce_recovered: f64,
    pub mean_fvu: f64,
    pub mean_l0: f64,
    pub never_fired: f64,
}

/// What a run stands for in the comparison: which connections, and whether the suite was
/// finetuned. Runs of the same role from several seeds are aggregated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Role {
    pub finetuned: bool,
    /// `None`: all connections.
    pub c: Option<u64>,
    /// The random-connections control.
    pub random: bool,
    /// Connections learned by learn-connections (not the top C by score).
    pub learned: bool,
    pub embed_c: Option<u64>,
    pub unembed_c: Option<u64>,
}

impl Role {
    /// `all`, `top 16`, `random 16`, with `, embed E` / `, unembed U`.
    pub fn connections(&self) -> String {
        let mut out = match (self.c, self.random) {
            (None, _) => "all".to_string(),
            (Some(c), true) => format!("random {c}"),
            (Some(c), false) if self.learned => format!("learned {c}"),
            (Some(c), false) => format!("top {c}"),
        };
        if let Some(e) = self.embed_c {
            out.push_str(&format!(", embed {e}"));
        }
        if let Some(u) = self.unembed_c {
            out.push_str(&format!(", unembed {u}"));
        }
        out
    }

    fn ends(&self) -> (Option<u64>, Option<u64>) {
        (self.embed_c, self.unembed_c)
    }
}

/// Read `dir/eval.json`.
pub fn load_run(dir: &Path) -> Result<Run> {
    let r = EvalReport::read(dir)?;
    // select-edges --random records its seed; older eval.json files: look in the file.
    let random = r.random_connections
        || r.connections
            .as_deref()
            .is_some_and(|p| EdgesMeta::of_file(p).is_ok_and(|m| m.get(Key::RandomSeed).is_some()));
    let training = r.suite_training.as_ref().filter(|_| r.finetuned());
    let flags = training.map(|t| &t["flags"]);
    let recipe = training.map(|t| {
        let f = &t["flags"];
        let steps = t["steps"].as_u64().map_or("?".to_string(), |s| s.to_string());
        let lr = f["--lr"].as_f64().map_or("?".to_string(), |l| format!("{l:e}"));
        let loss = f["--loss"].as_str().unwrap_or("?");
        let mut s = format!("{loss}, {steps} steps, lr {lr}, batch {}", f["--batch-size"]);
        if let Some(a) = f["--auxk-alpha"].as_f64().filter(|a| *a > 0.0) {
            s.push_str(&format!(", AuxK {a}"));
        }
        s
    });
    let recipe_flags = flags.and_then(|f| f.as_object()).map(|m| {
        let mut m = m.clone();
        for k in ["--connections", "--suite", "--seed"] {
            m.remove(k);
        }
        m.insert("steps".into(), training.map_or(serde_json::Value::Null, |t| t["steps"].clone()));
        serde_json::Value::Object(m)
    });
    let root = r.root_suite_id.clone().unwrap_or_else(|| dir.display().to_string());
    let seed_group = match flags.map(|f| &f["--seed"]) {
        Some(s) if !s.is_null() => format!("{root}/seed {s}"),
        _ => root.clone(),
    };
    Ok(Run {
        dir: dir.to_path_buf(),
        role: Role {
            finetuned: r.finetuned(),
            c: r.c,
            random,
            learned: r.learned_connections,
            embed_c: r.embed_c,
            unembed_c: r.unembed_c,
        },
        tokens: r.tokens.clone(),
        cache: r.cache_id.clone().unwrap_or_else(|| r.acts.display().to_string()),
        unsure: false,
        n_tokens: r.n_tokens,
        root,
        seed_group,
        recipe,
        recipe_flags,
        lineage_recorded: r.suite_lineage_recorded,
        ce_diff: r.ce_diff,
        ce_recovered: r.ce_recovered,
        mean_fvu: r.mean_fvu,
        mean_l0: r.mean_l0,
        never_fired: r.dead_fraction,
    })
}

/// Label each run by its cache rather than by its own suite: a cache is `training` tokens when
/// any evaluated suite was trained on it, else `held-out` when any suite says it was not, else
/// `unknown`. A run whose suite records no lineage (a reference suite) is thereby compared on
/// the cache's split, and marked `unsure`; a run that is `unknown` for another reason (a data
/// fingerprint missing) keeps its own column. Returns how many runs are unsure.
pub fn settle_splits(runs: &mut [Run]) -> usize {
    let mut split: BTreeMap<String, &'static str> = BTreeMap::new();
    for r in runs.iter() {
        let s = split.entry(r.cache.clone()).or_insert("unknown");
        match r.tokens.as_str() {
            "training" => *s = "training",
            "held-out" if *s == "unknown" => *s = "held-out",
            _ => {}
        }
    }
    let mut unsure = 0;
    for r in runs.iter_mut() {
        let s = split[&r.cache];
        if r.tokens == "unknown" && s != "unknown" && !r.lineage_recorded {
            r.unsure = true;
            unsure += 1;
            r.tokens = s.to_string();
        } else if r.tokens != "unknown" {
            r.tokens = s.to_string();
        }
    }
    unsure
}

/// Runs that share a role, split and seed (the same suite evaluated twice, or a comparison given
/// one folder twice): their folders, for a warning under the table.
fn duplicates(runs: &[Run]) -> Vec<String> {
    let mut seen: BTreeMap<(Role, &str, &str), Vec<&Path>> = BTreeMap::new();
    for r in runs {
        seen.entry((r.role.clone(), r.tokens.as_str(), r.seed_group.as_str())).or_default().push(&r.dir);
    }
    seen.into_values()
        .filter(|d| d.len() > 1)
        .map(|d| d.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and "))
        .collect()
}

/// Mean, smallest and largest of some runs' values.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    /// The statistics of `values` (`None` when empty).
    pub fn of(values: &[f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let (min, max) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        Some(Stat { mean, min, max, n })
    }

    /// `0.0477`, or `0.0477 (0.0412–0.0530)` over several runs.
    pub fn show(&self, digits: usize) -> String {
        if self.n == 1 {
            format!("{:.*}", digits, self.mean)
        } else {
            format!("{:.*} ({:.*}–{:.*})", digits, self.mean, digits, self.min, digits, self.max)
        }
    }
}

/// The split the summary is about: held-out tokens when any run has them, else training
/// tokens, else runs whose split is unknown.
pub fn primary_split(runs: &[Run]) -> &'static str {
    ["held-out", "training", "unknown"].into_iter().find(|s| runs.iter().any(|r| r.tokens == *s)).unwrap_or("unknown")
}

/// The roles present, in table order: not finetuned before finetuned, all connections first,
/// then top, then random, ascending C, dense ends before sparse ends.
pub fn roles(runs: &[Run]) -> Vec<Role> {
    let mut roles: Vec<Role> = runs.iter().map(|r| r.role.clone()).collect();
    roles.sort_by_key(|r| {
        (
            r.finetuned,
            r.c.is_some(),
            r.random,
            r.learned,
            r.c,
            r.embed_c.is_some() || r.unembed_c.is_some(),
            r.embed_c,
            r.unembed_c,
        )
    });
    roles.dedup();
    roles
}

fn values(runs: &[Run], role: &Role, split: &str, get: fn(&Run) -> f64) -> Option<Stat> {
    let v: Vec<f64> = runs.iter().filter(|r| r.role == *role && r.tokens == split).map(get).collect();
    Stat::of(&v)
}

/// The comparison as a markdown table: one row per role; CE diff for each split present,
/// then mean FVU, L0 and never-fired features on the primary split.
pub fn table(runs: &[Run]) -> String {
    let primary = primary_split(runs);
    let splits: Vec<&str> =
        ["held-out", "training", "unknown"].into_iter().filter(|s| runs.iter().any(|r| r.tokens == *s)).collect();
    let name = |s: &str| match s {
        "held-out" => "held-out tokens".to_string(),
        "training" => "training tokens".to_string(),
        _ => "tokens of unknown split".to_string(),
    };
    let mut head = vec!["connections".to_string(), "suite".to_string()];
    head.extend(splits.iter().map(|s| format!("CE diff, {}", name(s))));
    head.extend([
        format!("CE recovered, {}", name(primary)),
        format!("mean FVU, {}", name(primary)),
        "L0".to_string(),
        "never fired %".to_string(),
        "seeds".to_string(),
    ]);
    let mut out = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    for role in roles(runs) {
        let mut row = vec![role.connections(), if role.finetuned { "finetuned" } else { "not finetuned" }.to_string()];
        for s in &splits {
            row.push(values(runs, &role, s, |r| r.ce_diff).map_or("—".into(), |v| v.show(4)));
        }
        let p = |get: fn(&Run) -> f64, digits: usize| {
            values(runs, &role, primary, get).map_or("—".into(), |v| v.show(digits))
        };
        row.push(p(|r| r.ce_recovered, 3));
        row.push(p(|r| r.mean_fvu, 4));
        row.push(p(|r| r.mean_l0, 1));
        row.push(p(|r| 100.0 * r.never_fired, 1));
        let seeds: std::collections::BTreeSet<&str> =
            runs.iter().filter(|r| r.role == role).map(|r| r.seed_group.as_str()).collect();
        row.push(seeds.len().to_string());
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out.push_str(
        "\nCE diff: CE with the suite spliced in minus the clean model's CE (nats; lower is better). Several seeds: mean (smallest–largest).\n\
         mean FVU: fraction of each module's target variance left unexplained, over all tokens, averaged over modules.\n\
         never fired: features with no non-zero value on the evaluated tokens (training logs count `dead` over a window instead).\n",
    );
    for d in duplicates(runs) {
        out.push_str(&format!("warning: these runs share a role, split and seed, and count as one seed each: {d}\n"));
    }
    let unsure = runs.iter().filter(|r| r.unsure).count();
    if unsure > 0 {
        out.push_str(&format!(
            "{unsure} run(s) marked * evaluate a suite that records no training data (e.g. a reference suite): its columns are the cache's split for the other suites; whether that suite saw these tokens is unknown.\n"
        ));
    }
    out.push_str("\nRuns:\n");
    for r in runs {
        let suite = if r.role.finetuned { "finetuned" } else { "not finetuned" };
        let mark = if r.unsure { " *" } else { "" };
        out.push_str(&format!("- {}, {suite}, {} tokens{mark}: {}\n", r.role.connections(), r.tokens, r.dir.display()));
    }
    out
}

/// The runs of `role` on `split`, by seed group.
fn by_seed<'a>(runs: &'a [Run], role: &Role, split: &str) -> BTreeMap<&'a str, &'a Run> {
    runs.iter().filter(|r| r.role == *role && r.tokens == split).map(|r| (r.seed_group.as_str(), r)).collect()
}

/// `x` as a percentage with no decimals.
fn pct(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

/// The verdict band of a share of the gap closed: 3 matches or beats (≥ 100%), 2 most (≥ 50%),
/// 1 part (> 0), 0 none.
fn band(share: f64) -> u8 {
    match share {
        s if s >= 1.0 => 3,
        s if s >= 0.5 => 2,
        s if s > 0.0 => 1,
        _ => 0,
    }
}

/// What the runs say about the method, in words, on the primary split. `None` without an
/// unfinetuned all-connections run and a top-C run before and after finetuning.
pub fn summary(runs: &[Run]) -> Option<String> {
    let split = primary_split(runs);
    let on = |r: &Role| values(runs, r, split, |x| x.ce_diff);
    let all0 = Role { finetuned: false, c: None, random: false, learned: false, embed_c: None, unembed_c: None };
    let a = on(&all0)?;
    // With sparse ends, the runs that have them are the subject.
    let sparse = runs.iter().find(|r| r.role.c.is_some() && r.role.ends() != (None, None)).map(|r| r.role.ends());
    let (embed_c, unembed_c) = sparse.unwrap_or((None, None));
    let main = &runs
        .iter()
        .find(|r| !r.role.finetuned && !r.role.random && r.role.c.is_some() && r.role.ends() == (embed_c, unembed_c))?
        .role;
    let (c, learned) = (main.c?, main.learned);
    let top0 = Role { c: Some(c), embed_c, unembed_c, learned, ..all0.clone() };
    let top1 = Role { finetuned: true, ..top0.clone() };
    let all1 = Role { finetuned: true, ..all0.clone() };
    let rand1 = Role { random: true, learned: false, ..top1.clone() };
    let (b, x) = (on(&top0)?, on(&top1)?);
    let y = on(&all1);
    let r = on(&rand1);
    let n_tokens = runs.iter().filter(|r| r.tokens == split).map(|r| r.n_tokens).max().unwrap_or(0);
    let seeds = by_seed(runs, &top1, split).len();
    let recipe = runs.iter().find(|r| r.role == top1).and_then(|r| r.recipe.clone()).unwrap_or_default();
    let mut out = String::new();
    let where_ = match split {
        "held-out" => format!("On held-out tokens ({n_tokens} tokens of text the suites never saw in training; training-token numbers in the table)"),
        "training" => format!("On the tokens the suites were trained on ({n_tokens}; no held-out evaluation was given, so these numbers flatter every suite)"),
        _ => format!("On {n_tokens} tokens that the suites do not say whether they saw in training"),
    };
    let over = if seeds > 1 { format!(", mean (range) over {seeds} seeds") } else { String::new() };
    out.push_str(&format!("{where_}, CE diff{over}:\n"));
    out.push_str(&format!("- all connections, not finetuned: {}\n", a.show(4)));
    let chosen = if learned { " (connections learned by learn-connections)" } else { "" };
    out.push_str(&format!("- pruned to C={c}{chosen}, not finetuned: {}\n", b.show(4)));
    out.push_str(&format!("- pruned to C={c}{chosen}, finetuned through the pruned pass ({recipe}): {}\n", x.show(4)));
    // Whether the controls really were finetuned the same way: every flag of their runs but
    // the connections, the suite and the seed.
    let flags_of = |role: &Role| -> Vec<&serde_json::Value> {
        runs.iter().filter(|r| r.role == *role).filter_map(|r| r.recipe_flags.as_ref()).collect()
    };
    let ours = flags_of(&top1);
    let same_as_ours = |role: &Role| flags_of(role).iter().all(|f| ours.iter().all(|o| o == f));
    let how =
        |role: &Role| if same_as_ours(role) { "finetuned the same way" } else { "finetuned another way (see below)" };
    if let Some(y) = y {
        out.push_str(&format!("- all connections, {} (the control): {}\n", how(&all1), y.show(4)));
    }
    if let Some(r) = r {
        out.push_str(&format!("- random C={c} connections, {}: {}\n", how(&rand1), r.show(4)));
    }
    for (role, what) in [(&all1, "all-connections control"), (&rand1, "random-connections control")] {
        if !same_as_ours(role) {
            let recipe_of = |role: &Role| runs.iter().find(|r| r.role == *role).and_then(|r| r.recipe.clone());
            out.push_str(&format!(
                "Caution: the {what} was not finetuned the same way ({} vs {}; other flags may differ too); the comparison below is confounded.\n",
                recipe_of(role).unwrap_or_default(),
                recipe_of(&top1).unwrap_or_default()
            ));
        }
    }
    // Per seed: the gap closed and the random control.
    let (b_s, x_s, y_s, r_s) = (
        by_seed(runs, &top0, split),
        by_seed(runs, &top1, split),
        by_seed(runs, &all1, split),
        by_seed(runs, &rand1, split),
    );
    let mut closed = Vec::new();
    let mut no_gap = 0;
    let mut beats_random = (0, 0);
    let mut beats_control = (0, 0);
    for (seed, xr) in &x_s {
        // The unfinetuned suite of a seed is its pretrained suite, whatever the finetuning seed.
        let before = b_s.get(*seed).or_else(|| b_s.get(xr.root.as_str()));
        if let (Some(br), Some(yr)) = (before, y_s.get(seed)) {
            let gap = br.ce_diff - yr.ce_diff;
            if gap > 0.0 {
                closed.push((br.ce_diff - xr.ce_diff) / gap);
            } else {
                no_gap += 1;
            }
            beats_control.1 += 1;
            beats_control.0 += usize::from(xr.ce_diff <= yr.ce_diff);
        }
        if let Some(rr) = r_s.get(seed) {
            beats_random.1 += 1;
            beats_random.0 += usize::from(xr.ce_diff < rr.ce_diff);
        }
    }
    let mut verdict = Vec::new();
    if let Some(y) = y {
        let gap = b.mean - y.mean;
        if gap > 0.0 {
            let share = (b.mean - x.mean) / gap;
            let range = match Stat::of(&closed) {
                Some(s) if s.n > 1 => format!(" ({}–{} across seeds)", pct(s.min), pct(s.max)),
                _ => String::new(),
            };
            out.push_str(&format!(
                "Finetuning through the pruned pass closes {}{range} of the gap between the pruned suite ({:.4}) and the all-connections suite finetuned the same way ({:.4}); ",
                pct(share),
                b.mean,
                y.mean
            ));
            if x.mean <= y.mean {
                out.push_str(&format!("the pruned suite ends {:.4} below that control.\n", y.mean - x.mean));
            } else {
                out.push_str(&format!("the pruned suite ends {:.4} above that control.\n", x.mean - y.mean));
            }
            let n_closed = closed.len();
            verdict.push(match share {
                s if s >= 1.0 => format!("finetuning through the sparse pass matches or beats the equally finetuned all-connections suite at C={c} (in {} of {} seeds)", beats_control.0, beats_control.1),
                s if s >= 0.5 => format!("finetuning through the sparse pass closes most ({}) of the gap to the equally finetuned all-connections suite at C={c}", pct(s)),
                s if s > 0.0 => format!("finetuning through the sparse pass closes only {} of the gap to the equally finetuned all-connections suite at C={c}", pct(s)),
                _ => format!("finetuning through the sparse pass does not close the gap to the equally finetuned all-connections suite at C={c}"),
            });
            let off = closed.iter().any(|v| band(*v) != band(share));
            if (n_closed > 1 && off) || no_gap > 0 {
                let mut per_seed = closed.iter().map(|v| pct(*v)).collect::<Vec<_>>().join(", ");
                if no_gap > 0 {
                    per_seed.push_str(&format!("; {no_gap} seed(s) with no gap to close"));
                }
                verdict.push(format!("but not in every seed (gap closed per seed: {per_seed})"));
            }
        } else {
            out.push_str(&format!(
                "Finetuning the all-connections suite the same way ({:.4}) does no better than the pruned suite before finetuning ({:.4}): there is no gap to close.\n",
                y.mean, b.mean
            ));
        }
    } else {
        let cost = b.mean - a.mean;
        out.push_str(&format!(
            "Without the all-connections suite finetuned the same way, finetuning's gain ({:.4}) cannot be told from the gain of training longer.\n",
            b.mean - x.mean
        ));
        if cost > 0.0 {
            out.push_str(&format!("(Pruning cost {:.4} against the unfinetuned all-connections suite.)\n", cost));
        }
    }
    if let Some(r) = r {
        let all_seeds = beats_random.0 == beats_random.1;
        out.push_str(&format!(
            "Selected connections beat random ones in {} of {} seed(s) ({} vs {}).\n",
            beats_random.0,
            beats_random.1,
            x.show(4),
            r.show(4)
        ));
        verdict.push(if all_seeds && beats_random.1 > 0 {
            "the selected connections beat random ones in every seed".to_string()
        } else {
            format!(
                "the selected connections beat random ones in only {} of {} seed(s)",
                beats_random.0, beats_random.1
            )
        });
    }
    if let Some(z) = on(&Role { c: Some(0), ..top1.clone() }).filter(|_| c != 0) {
        out.push_str(&format!("No connections (C=0), finetuned: {}.\n", z.show(4)));
    }
    if sparse.is_some() {
        let dense1 = Role { embed_c: None, unembed_c: None, ..top1.clone() };
        if let Some(d) = on(&dense1) {
            let mut what = Vec::new();
            if let Some(e) = embed_c {
                what.push(format!("each feature reads at most {e} tokens of the embedding"));
            }
            if let Some(u) = unembed_c {
                what.push(format!("each output token reads at most {u} features"));
            }
            out.push_str(&format!(
                "Sparse ends: {}; with dense ends (the reference's pass) at the same C, finetuned: {:.4} ({:+.4} for the sparse ends).\n",
                what.join(", "),
                d.mean,
                x.mean - d.mean
            ));
        }
    }
    let nf = |role: &Role| values(runs, role, split, |r| r.never_fired);
    if let (Some(n0), Some(n1)) = (nf(&top0), nf(&top1)) {
        out.push_str(&format!(
            "Never-fired features on these tokens: {} before finetuning, {} after.\n",
            pct(n0.mean),
            pct(n1.mean)
        ));
    }
    if !verdict.is_empty() {
        out.push_str(&format!("So: {}.\n", verdict.join("; ")));
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests;
