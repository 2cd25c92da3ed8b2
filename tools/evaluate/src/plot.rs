//! The comparison plot of `evaluate --compare` (PNG and SVG): CE diff and mean FVU against C
//! on the primary split (held-out tokens when present), one line per kind of run, means with
//! bars from the smallest to the largest seed, runs with all connections as dashed levels. The
//! legend sits in its own strip under the panels, one entry per line, so it never covers data.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::report::{primary_split, roles, Role, Run, Stat};

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

/// One line of the plot: runs of one kind at several C (or one level, for all connections).
struct Series {
    label: String,
    color: RGBColor,
    dashed: bool,
    /// (x, value) per C, or one value for all connections.
    points: Vec<(f64, Stat)>,
}

/// C on a log2 scale, C = 0 one step left of C = 1, so that 0, 4, 16 and 64 spread evenly.
fn xc(c: u64) -> f64 {
    if c == 0 {
        -1.0
    } else {
        (c as f64).log2()
    }
}

fn series(runs: &[Run], get: fn(&Run) -> f64) -> Vec<Series> {
    let split = primary_split(runs);
    let stat = |role: &Role| {
        let v: Vec<f64> = runs.iter().filter(|r| r.role == *role && r.tokens == split).map(get).collect();
        Stat::of(&v)
    };
    let mut out: Vec<Series> = Vec::new();
    const COLORS: [RGBColor; 6] = [
        RGBColor(0, 90, 200),
        RGBColor(220, 50, 32),
        RGBColor(0, 150, 60),
        RGBColor(120, 60, 170),
        RGBColor(230, 150, 0),
        RGBColor(0, 160, 170),
    ];
    for role in roles(runs) {
        let Some(s) = stat(&role) else { continue };
        let suite = if role.finetuned { "finetuned" } else { "not finetuned" };
        let kind = match (role.c, role.random) {
            (None, _) => "all connections".to_string(),
            (Some(_), true) => "random connections".to_string(),
            (Some(_), false) => "top-C connections".to_string(),
        };
        let mut ends = String::new();
        if let Some(e) = role.embed_c {
            ends.push_str(&format!(", embed {e}"));
        }
        if let Some(u) = role.unembed_c {
            ends.push_str(&format!(", unembed {u}"));
        }
        let label = format!("{kind}{ends}, {suite}");
        let x = role.c.map(xc);
        match out.iter_mut().find(|sr| sr.label == label) {
            Some(sr) => sr.points.push((x.unwrap_or(0.0), s)),
            None => {
                let color = COLORS[out.len() % COLORS.len()];
                out.push(Series { label, color, dashed: role.c.is_none(), points: vec![(x.unwrap_or(0.0), s)] });
            }
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, runs: &[Run], text: bool) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing: {e}");
    root.fill(&WHITE).map_err(err)?;
    let metrics: [(&str, fn(&Run) -> f64); 2] = [("CE diff", |r| r.ce_diff), ("mean FVU", |r| r.mean_fvu)];
    let lines = series(runs, metrics[0].1);
    let (_, h) = root.dim_in_pixel();
    let legend_h = if text { 24 * lines.len().div_ceil(2) as u32 + 16 } else { 0 };
    let (plots, legend) = root.split_vertically(h.saturating_sub(legend_h));
    let panels = plots.split_evenly((1, 2));
    let cs: Vec<f64> = runs.iter().filter_map(|r| r.role.c).map(xc).collect();
    let (x_lo, x_hi) = if cs.is_empty() {
        (-1.0, 1.0)
    } else {
        let (lo, hi) = cs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        (lo - 0.6, hi + 0.6)
    };
    let split = primary_split(runs);
    for (panel, (name, get)) in panels.iter().zip(metrics) {
        let all = series(runs, get);
        let vals: Vec<f64> = all.iter().flat_map(|s| s.points.iter().flat_map(|(_, p)| [p.min, p.max])).collect();
        let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        // Never an empty range: at least 1e-3 or 10% of the values' size on each side.
        let pad = ((hi - lo) * 0.08).max(1e-3).max(0.02 * hi.abs().max(lo.abs()));
        let mut builder = ChartBuilder::on(panel);
        builder.margin(15);
        if text {
            builder
                .caption(format!("{name} vs C ({split} tokens)"), ("sans-serif", 18))
                .x_label_area_size(35)
                .y_label_area_size(60);
        }
        let mut chart = builder.build_cartesian_2d(x_lo..x_hi, (lo - pad)..(hi + pad)).map_err(err)?;
        let mut mesh = chart.configure_mesh();
        // One tick per power of two (and 0), labelled with C itself.
        let c_label = |x: &f64| match x.round() {
            r if (x - r).abs() > 1e-6 => String::new(),
            r if r < -0.5 => "0".to_string(),
            r => format!("{}", r.exp2() as u64),
        };
        mesh.x_label_formatter(&c_label).x_labels(((x_hi - x_lo).ceil() as usize + 1).max(2));
        if text {
            mesh.x_desc("C (connections per feature, log scale)").y_desc(name);
        } else {
            mesh.disable_x_mesh().disable_y_mesh();
        }
        mesh.draw().map_err(err)?;
        for s in &all {
            let style = s.color.stroke_width(2);
            if s.dashed {
                let y = s.points[0].1.mean;
                chart.draw_series(DashedLineSeries::new(vec![(x_lo, y), (x_hi, y)], 6, 4, style)).map_err(err)?;
                continue;
            }
            let pts: Vec<(f64, f64)> = s.points.iter().map(|(x, p)| (*x, p.mean)).collect();
            chart.draw_series(LineSeries::new(pts.clone(), style)).map_err(err)?;
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, s.color.filled()))).map_err(err)?;
            // The spread over seeds.
            for (x, p) in s.points.iter().filter(|(_, p)| p.n > 1) {
                chart
                    .draw_series(std::iter::once(PathElement::new(vec![(*x, p.min), (*x, p.max)], style)))
                    .map_err(err)?;
            }
        }
    }
    if text {
        // The legend strip: two entries per row, each line once.
        let (w, _) = legend.dim_in_pixel();
        for (i, s) in lines.iter().enumerate() {
            let (col, row) = ((i % 2) as i32, (i / 2) as i32);
            let x = 40 + col * (w as i32 / 2);
            let y = 10 + row * 24;
            let style = s.color.stroke_width(2);
            if s.dashed {
                legend.draw(&PathElement::new(vec![(x, y + 8), (x + 12, y + 8)], style)).map_err(err)?;
                legend.draw(&PathElement::new(vec![(x + 18, y + 8), (x + 30, y + 8)], style)).map_err(err)?;
            } else {
                legend.draw(&PathElement::new(vec![(x, y + 8), (x + 30, y + 8)], style)).map_err(err)?;
                legend.draw(&Circle::new((x + 15, y + 8), 4, s.color.filled())).map_err(err)?;
            }
            legend.draw(&Text::new(s.label.clone(), (x + 40, y), ("sans-serif", 15))).map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Write the comparison plot as `stem.svg` and `stem.png` (each via `.tmp` + rename).
pub fn plot(runs: &[Run], stem: &Path) -> Result<()> {
    let text = register_font();
    if !text {
        scae::note!("evaluate: warning: no TrueType font found (DejaVuSans); plots have no labels");
    }
    let legend_rows = series(runs, |r| r.ce_diff).len().div_ceil(2) as u32;
    let (w, h) = (1100u32, 420u32 + 24 * legend_rows + 16);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Run;

    /// The report tests' run, on the split `tokens` (its own cache), without a recipe.
    fn run(finetuned: bool, c: Option<u64>, random: bool, tokens: &str, seed: &str, ce_diff: f64) -> Run {
        let mut r = crate::report::tests::run(finetuned, c, random, seed, ce_diff);
        r.dir = std::path::PathBuf::from(format!("e-{seed}-{tokens}"));
        (r.tokens, r.cache, r.n_tokens) = (tokens.into(), tokens.into(), 100);
        (r.recipe, r.recipe_flags) = (None, None);
        r
    }

    /// Every line of the plot has one legend entry, in the strip below the panels (never over
    /// the data), and equal values (a flat FVU here) still get an axis range.
    #[test]
    fn legend_entries_are_unique_and_below_the_panels() {
        let mut runs = Vec::new();
        for seed in ["a", "b"] {
            for tokens in ["held-out", "training"] {
                runs.push(run(false, None, false, tokens, seed, 0.01));
                runs.push(run(true, None, false, tokens, seed, 0.005));
                runs.push(run(false, Some(16), false, tokens, seed, 0.5));
                runs.push(run(true, Some(16), false, tokens, seed, 0.02));
                runs.push(run(true, Some(4), false, tokens, seed, 0.1));
                runs.push(run(true, Some(16), true, tokens, seed, 0.2));
            }
        }
        let lines = series(&runs, |r| r.ce_diff);
        let labels: Vec<&str> = lines.iter().map(|s| s.label.as_str()).collect();
        let mut unique = labels.clone();
        unique.dedup();
        assert_eq!(labels.len(), 5, "{labels:?}");
        assert_eq!(unique.len(), labels.len(), "{labels:?}");
        // One point per C for top-C finetuned (two seeds, one split: means with a range).
        let top = lines.iter().find(|s| s.label == "top-C connections, finetuned").unwrap();
        assert_eq!(top.points.len(), 2);
        assert_eq!(top.points[1].1.n, 2);
        let (w, h) = (1100u32, 420u32 + 24 * 3 + 16);
        let mut svg = String::new();
        let text = register_font();
        draw(SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area(), &runs, text).unwrap();
        if text {
            for l in &labels {
                assert_eq!(svg.matches(&format!("\n{l}\n</text>")).count(), 1, "legend entry {l} in the SVG");
            }
        }
    }
}
