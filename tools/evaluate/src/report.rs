//! `evaluate --compare`: a markdown table and a plot (PNG and SVG) of several evaluation runs,
//! e.g. a sweep over C.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

/// One evaluation run (an `evaluate --out` folder).
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub c: Option<u64>,
    pub finetuned: bool,
    /// The connections are the random control (select-edges --random).
    pub random: bool,
    /// The most embed edges of any feature (none: the whole embedding).
    pub embed_c: Option<u64>,
    /// The most features any output token reads (none: all of them).
    pub unembed_c: Option<u64>,
    pub ce: f64,
    pub ce_diff: f64,
    pub ce_recovered: f64,
    pub mean_fvu: f64,
    pub mean_l0: f64,
    pub dead: f64,
}

/// Read `dir/eval.json`.
pub fn load_run(dir: &Path) -> Result<Run> {
    let r = scae::formats::eval::EvalReport::read(dir)?;
    // select-edges --random records its seed in the parquet's metadata.
    let random = r.connections.as_deref().is_some_and(|p| {
        p.extension().is_some_and(|e| e == "parquet")
            && scae::util::table::parquet_metadata(p).is_ok_and(|m| m.iter().any(|(k, _)| k == "random_seed"))
    });
    Ok(Run {
        dir: dir.to_path_buf(),
        c: r.c,
        finetuned: r.finetuned(),
        random,
        embed_c: r.embed_c,
        unembed_c: r.unembed_c,
        ce: r.ce,
        ce_diff: r.ce_diff,
        ce_recovered: r.ce_recovered,
        mean_fvu: r.mean_fvu,
        mean_l0: r.mean_l0,
        dead: r.dead_fraction,
    })
}

/// The comparison as a markdown table, sorted by suite kind and C.
pub fn table(runs: &[Run]) -> String {
    let mut out = String::from("| C | connections | suite | CE | CE diff | CE recovered | mean FVU | L0 | dead % | run |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        out.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:.3} | {:.4} | {:.1} | {:.1} | {} |\n",
            r.c.map(|c| c.to_string()).unwrap_or_else(|| "all".into()),
            kind(r),
            if r.finetuned { "finetuned" } else { "not finetuned" },
            r.ce,
            r.ce_diff,
            r.ce_recovered,
            r.mean_fvu,
            r.mean_l0,
            100.0 * r.dead,
            r.dir.display()
        ));
    }
    out
}

/// What the connections are: `all`, `top` (selected by score) or `random` (the control),
/// with `, embed E` when the features read at most E tokens each.
fn kind(r: &Run) -> String {
    let base = match (r.c, r.random) {
        (None, _) => "all",
        (Some(_), true) => "random",
        (Some(_), false) => "top",
    };
    let mut out = base.to_string();
    if let Some(e) = r.embed_c {
        out.push_str(&format!(", embed {e}"));
    }
    if let Some(u) = r.unembed_c {
        out.push_str(&format!(", unembed {u}"));
    }
    out
}

/// Sort runs: finetuned after not, random after top, then all connections and ascending C,
/// the whole embedding before embed connections.
pub fn sort_runs(runs: &mut [Run]) {
    runs.sort_by_key(|r| {
        (r.finetuned, r.random, r.c.map_or(0, |c| c.saturating_add(1)), r.embed_c.is_some() || r.unembed_c.is_some())
    });
}

/// What the runs say about the method, in words: how much pruning to C costs, how much of it
/// finetuning through the pruned pass wins back, and the controls. `None` without an
/// unfinetuned all-connections run and a top-C run before and after finetuning.
pub fn summary(runs: &[Run]) -> Option<String> {
    let all = runs.iter().find(|r| r.c.is_none() && !r.finetuned)?;
    // With embed connections, the runs that have them are the subject; the whole-embedding
    // run at the same C is their comparison.
    let ends = |r: &Run| (r.embed_c, r.unembed_c);
    let sparse_ends = runs.iter().find(|r| r.c.is_some() && ends(r) != (None, None)).map(ends).unwrap_or((None, None));
    let before = runs.iter().find(|r| !r.finetuned && !r.random && r.c.is_some() && ends(r) == sparse_ends)?;
    let c = before.c?;
    let after = runs.iter().find(|r| r.finetuned && !r.random && r.c == Some(c) && ends(r) == sparse_ends)?;
    let cost = before.ce_diff - all.ce_diff;
    let won = before.ce_diff - after.ce_diff;
    let mut out = format!(
        "CE diff (CE with the suite spliced in minus clean CE; lower is better): all connections {:.4}; \
         pruned to C={c} {:.4} (+{:.4}); finetuned through the pruned pass {:.4}",
        all.ce_diff, before.ce_diff, cost, after.ce_diff
    );
    if cost > 0.0 {
        out.push_str(&format!(", winning back {:.0}% of what pruning cost", 100.0 * won / cost));
    }
    out.push_str(&format!(
        ".\nDead features (never firing on these tokens): {:.0}% before finetuning, {:.0}% after.\n",
        100.0 * before.dead,
        100.0 * after.dead
    ));
    if let Some(d) = runs
        .iter()
        .find(|r| r.finetuned && !r.random && r.c == Some(c) && ends(r) == (None, None))
        .filter(|_| sparse_ends != (None, None))
    {
        let mut what = Vec::new();
        if let Some(e) = sparse_ends.0 {
            what.push(format!("each feature reads at most {e} tokens of the embedding"));
        }
        if let Some(u) = sparse_ends.1 {
            what.push(format!("each output token reads at most {u} features"));
        }
        out.push_str(&format!(
            "Sparse ends: {}; with dense ends (the reference's pass) at the same C, finetuned: {:.4} ({:+.4} for the sparse ends).\n",
            what.join(", "),
            d.ce_diff,
            after.ce_diff - d.ce_diff
        ));
    }
    let random = runs.iter().find(|r| r.finetuned && r.random && r.c == Some(c) && ends(r) == sparse_ends);
    let zero = runs.iter().find(|r| r.finetuned && r.c == Some(0)).filter(|_| c != 0);
    if let Some(r) = random {
        let tokens = if sparse_ends != (None, None) { " and ends" } else { "" };
        out.push_str(&format!(
            "Control: random C={c} connections{tokens}, finetuned the same way: {:.4}.\n",
            r.ce_diff
        ));
    }
    if let Some(z) = zero {
        out.push_str(&format!("Control: no connections (C=0), finetuned: {:.4}.\n", z.ce_diff));
    }
    let mut wrong = Vec::new();
    if after.ce_diff >= before.ce_diff {
        wrong
            .push(format!("finetuning did not lower CE diff at C={c} ({:.4} -> {:.4})", before.ce_diff, after.ce_diff));
    }
    if let Some(r) = random.filter(|r| r.ce_diff <= after.ce_diff) {
        wrong.push(format!(
            "random connections did as well as the selected ones ({:.4} vs {:.4})",
            r.ce_diff, after.ce_diff
        ));
    }
    if let Some(z) = zero.filter(|z| z.ce_diff <= after.ce_diff) {
        wrong.push(format!("C=0 did as well as C={c} ({:.4} vs {:.4})", z.ce_diff, after.ce_diff));
    }
    if wrong.is_empty() {
        out.push_str(&format!(
            "So: the selected connections carry what the suite needs, and finetuning through the sparse pass recovers most of the pruning cost at C={c}.\n"
        ));
    } else {
        out.push_str(&format!("Not the result SCAEs promise: {}.\n", wrong.join("; ")));
    }
    Some(out)
}

/// Find a TrueType font for plot labels; without one, plots are drawn without text.
fn register_font() -> bool {
    const CANDIDATES: [&str; 4] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
    ];
    for c in CANDIDATES {
        if let Ok(bytes) = std::fs::read(c) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, runs: &[Run], text: bool) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
    let panels = root.split_evenly((1, 2));
    let metrics: [(&str, fn(&Run) -> f64); 2] = [("CE diff", |r| r.ce_diff), ("mean FVU", |r| r.mean_fvu)];
    // C on a log2 scale, C = 0 one step left of C = 1, so that 0, 4, 16 and 64 spread evenly.
    let xc = |c: u64| if c == 0 { -1.0 } else { (c as f64).log2() };
    let max_c = xc(runs.iter().filter_map(|r| r.c).max().unwrap_or(1).max(1)).max(1.0);
    for (panel, (name, get)) in panels.iter().zip(metrics) {
        let vals: Vec<f64> = runs.iter().map(get).collect();
        let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let pad = ((hi - lo).abs() * 0.1).max(1e-3);
        let mut builder = ChartBuilder::on(panel);
        builder.margin(15);
        if text {
            builder.caption(format!("{name} vs C"), ("sans-serif", 20)).x_label_area_size(35).y_label_area_size(55);
        }
        let mut chart = builder
            .build_cartesian_2d(-1.4f64..max_c + 0.4, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
        let mut mesh = chart.configure_mesh();
        // One tick per power of two (and 0), labelled with C itself.
        let c_label = |x: &f64| match x.round() {
            r if (x - r).abs() > 1e-6 => String::new(),
            r if r < -0.5 => "0".to_string(),
            r => format!("{}", r.exp2() as u64),
        };
        mesh.x_label_formatter(&c_label).x_labels((max_c + 1.8).ceil() as usize + 1);
        if text {
            mesh.x_desc("C (connections per feature, log scale)").y_desc(name);
        } else {
            mesh.disable_x_mesh().disable_y_mesh();
        }
        mesh.draw().map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
        for (finetuned, random, color) in
            [(true, false, RED), (false, false, BLUE), (true, true, GREEN), (false, true, CYAN)]
        {
            let mut pts: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.finetuned == finetuned && r.random == random && r.c.is_some())
                .map(|r| (xc(r.c.unwrap_or(0)), get(r)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if pts.is_empty() {
                continue;
            }
            let series = chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
            if text {
                let what = if finetuned { "finetuned" } else { "not finetuned" };
                series
                    .label(if random { format!("random connections, {what}") } else { what.to_string() })
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
        }
        // Reference lines: runs with all connections, and a lone unfinetuned run at some C.
        let unfinetuned_at_c: Vec<&Run> = runs.iter().filter(|r| !r.finetuned && !r.random && r.c.is_some()).collect();
        if let [r] = unfinetuned_at_c[..] {
            let y = get(r);
            let color = BLUE.mix(0.5);
            let series = chart
                .draw_series(DashedLineSeries::new(vec![(-1.4, y), (max_c + 0.4, y)], 3, 3, color.stroke_width(1)))
                .map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
            if text {
                series
                    .label(format!("not finetuned, C={}", r.c.unwrap_or(0)))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
        }
        for r in runs.iter().filter(|r| r.c.is_none()) {
            let color = if r.finetuned { RED.mix(0.5) } else { BLACK.mix(0.6) };
            let y = get(r);
            let series = chart
                .draw_series(DashedLineSeries::new(vec![(-1.4, y), (max_c + 0.4, y)], 6, 4, color.stroke_width(1)))
                .map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
            if text {
                let l = format!("all connections, {}", if r.finetuned { "finetuned" } else { "not finetuned" });
                series.label(l).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
    Ok(())
}

/// Write the comparison plot as `stem.svg` and `stem.png` (each via `.tmp` + rename).
pub fn plot(runs: &[Run], stem: &Path) -> Result<()> {
    let text = register_font();
    if !text {
        scae::note!("evaluate: warning: no TrueType font found (DejaVuSans); plots have no labels");
    }
    let (w, h) = (1100u32, 450u32);
    let svg = stem.with_extension("svg");
    let mut svg_text = String::new();
    draw(SVGBackend::with_string(&mut svg_text, (w, h)).into_drawing_area(), runs, text)?;
    scae::util::io::write_atomic(&svg, svg_text.as_bytes())?;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    draw(BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area(), runs, text)?;
    let png_path = stem.with_extension("png");
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().context("encoding PNG")?;
        wr.write_image_data(&buf).context("encoding PNG")?;
    }
    scae::util::io::write_atomic(&png_path, &bytes)?;
    Ok(())
}
