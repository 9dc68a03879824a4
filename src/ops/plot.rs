//! `uswap plot`: a PNG of a trace ([`super::trace`]) — per program, resident anonymous memory
//! (with its budget), the compressed store's size and the fault rate, over time.
//!
//! Drawn with `plotters` into an RGB buffer (no system library, no system font: the text uses
//! the Hack font compiled in from `epaint_default_fonts`) and encoded with the `png` crate.
//!
//! Owns: the picture. Must not: read anything but the samples it is given.

use std::path::Path;

use anyhow::{bail, Context};
use plotters::prelude::*;

use super::trace::TraceSample;

/// Picture size in pixels.
pub const WIDTH_PX: u32 = 1200;
pub const HEIGHT_PX: u32 = 900;

const FONT: &str = "sans-serif";
const MIB: f64 = (1u64 << 20) as f64;

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The compiled-in font is a valid TrueType font; a failure here is a packaging bug and
        // only costs the labels (drawing text without a font panics, so check it below).
        if plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        )
        .is_err()
        {
            tracing::error!("the compiled-in font did not load");
        }
    });
}

/// One program's time series, in plot units.
struct Line {
    label: String,
    rss_mib: Vec<(f64, f64)>,
    budget_mib: Option<f64>,
    store_mib: Vec<(f64, f64)>,
    faults_per_s: Vec<(f64, f64)>,
}

fn lines(samples: &[TraceSample]) -> Vec<Line> {
    let mut ids: Vec<u64> = Vec::new();
    for s in samples {
        for c in &s.clients {
            if !ids.contains(&c.id) {
                ids.push(c.id);
            }
        }
    }
    ids.iter()
        .map(|&id| {
            let mut l = Line {
                label: String::new(),
                rss_mib: vec![],
                budget_mib: None,
                store_mib: vec![],
                faults_per_s: vec![],
            };
            let mut prev: Option<(f64, u64)> = None;
            for s in samples {
                let Some(c) = s.clients.iter().find(|c| c.id == id) else {
                    continue;
                };
                l.label = format!("{} (pid {})", c.name, c.pid);
                l.budget_mib = c.budget_bytes.map(|b| b as f64 / MIB);
                l.rss_mib.push((s.t_s, c.rss_anon_bytes as f64 / MIB));
                l.store_mib.push((s.t_s, c.store_bytes as f64 / MIB));
                // The rate between consecutive samples, from the cumulative count.
                if let Some((t0, f0)) = prev {
                    if s.t_s > t0 {
                        let rate = c.faults.saturating_sub(f0) as f64 / (s.t_s - t0);
                        l.faults_per_s.push((s.t_s, rate));
                    }
                }
                prev = Some((s.t_s, c.faults));
            }
            l
        })
        .collect()
}

/// Renders `samples` as a PNG at `out`.
pub fn render(samples: &[TraceSample], out: &Path) -> anyhow::Result<()> {
    register_font();
    let lines = lines(samples);
    if lines.is_empty() {
        bail!("the trace holds no program (was anything attached while it was written?)");
    }
    let t_max = samples.iter().map(|s| s.t_s).fold(0.0, f64::max).max(1.0);
    let mut buf = vec![0u8; (WIDTH_PX * HEIGHT_PX * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE).context("drawing")?;
        let panels = root.split_evenly((3, 1));
        let max_of = |f: &dyn Fn(&Line) -> f64| lines.iter().map(f).fold(0.0, f64::max);
        let rss_top = max_of(&|l| {
            l.rss_mib
                .iter()
                .map(|p| p.1)
                .fold(l.budget_mib.unwrap_or(0.0), f64::max)
        });
        let store_top = max_of(&|l| l.store_mib.iter().map(|p| p.1).fold(0.0, f64::max));
        let rate_top = max_of(&|l| l.faults_per_s.iter().map(|p| p.1).fold(0.0, f64::max));
        type Pick = fn(&Line) -> &Vec<(f64, f64)>;
        let specs: [(&str, &str, f64, Pick); 3] = [
            ("resident anonymous memory", "MiB", rss_top, |l| &l.rss_mib),
            ("compressed store", "MiB", store_top, |l| &l.store_mib),
            ("faults served", "per s", rate_top, |l| &l.faults_per_s),
        ];
        for (i, (panel, (title, unit, top, pick))) in panels.iter().zip(specs).enumerate() {
            let top = (top * 1.1).max(1.0);
            let mut chart = ChartBuilder::on(panel)
                .caption(title, (FONT, 20))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..t_max, 0.0..top)
                .context("drawing")?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .y_desc(unit)
                .label_style((FONT, 13))
                .draw()
                .context("drawing")?;
            for (k, l) in lines.iter().enumerate() {
                let color = Palette99::pick(k).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        pick(l).iter().copied(),
                        color.stroke_width(2),
                    ))
                    .context("drawing")?
                    .label(l.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                if i == 0 {
                    if let Some(b) = l.budget_mib {
                        chart
                            .draw_series(DashedLineSeries::new(
                                [(0.0, b), (t_max, b)],
                                6,
                                4,
                                color.stroke_width(1),
                            ))
                            .context("drawing")?
                            .label(format!("budget of {}", l.label))
                            .legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(1))
                            });
                    }
                }
            }
            chart
                .configure_series_labels()
                .label_font((FONT, 13))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .context("drawing")?;
        }
        root.present().context("drawing")?;
    }
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), WIDTH_PX, HEIGHT_PX);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .with_context(|| format!("writing {}", out.display()))?;
    w.write_image_data(&buf)
        .with_context(|| format!("writing {}", out.display()))?;
    w.finish()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::trace::TraceClient;
    use super::*;

    #[test]
    fn render_writes_a_png_of_the_right_size() {
        let samples: Vec<TraceSample> = (0..20u64)
            .map(|i| TraceSample {
                t_s: i as f64 * 0.25,
                unix_ms: 0,
                clients: vec![TraceClient {
                    id: 1,
                    pid: 10,
                    name: "demo".into(),
                    alive: true,
                    rss_anon_bytes: (i * 3) << 20,
                    budget_bytes: Some(32 << 20),
                    store_bytes: i << 19,
                    store_uncompressed_bytes: i << 20,
                    pages_in_window: 0,
                    pages_evicted: i,
                    pages_restored: 0,
                    faults: i * i * 10,
                    fault_rate_per_s: 0.0,
                    fault_p99_us: 0.0,
                }],
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.png");
        render(&samples, &out).unwrap();
        let dec = png::Decoder::new(std::fs::File::open(&out).unwrap());
        let reader = dec.read_info().unwrap();
        assert_eq!(reader.info().width, WIDTH_PX);
        assert_eq!(reader.info().height, HEIGHT_PX);
    }

    #[test]
    fn render_of_an_empty_trace_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let e = render(&[], &dir.path().join("p.png")).unwrap_err();
        assert!(e.to_string().contains("no program"), "{e}");
    }
}
