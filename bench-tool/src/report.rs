//! The printed table and the SVG plot. The plot is written by hand (a few dozen lines of SVG
//! text) rather than with a plotting crate: one CDF chart does not justify the build time of
//! `plotters` and its font stack on a 2-core machine.

use std::fmt::Write;

use crate::phases::Results;

/// A markdown table: one row per phase.
pub fn table(r: &Results) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "pgwake-bench ({} pgwake) on {} CPUs, {}, {}, {}\n",
        r.mode, m.cpus, m.cpu_model, m.kernel, m.postgres
    );
    let _ = writeln!(
        out,
        "| phase | n | p50 ms | p90 ms | p99 ms | max ms | wall ms | starts | q/s | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in &r.phases {
        let s = &p.summary;
        let opt = |v: Option<f64>, prec: usize| {
            v.map(|v| format!("{v:.prec$}"))
                .unwrap_or_else(|| "".into())
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
            p.name,
            s.n,
            s.p50,
            s.p90,
            s.p99,
            s.max,
            opt(p.wall_ms, 0),
            p.starts.map(|s| s.to_string()).unwrap_or_default(),
            opt(p.queries_per_sec, 0),
            p.errors
        );
    }
    let held: Vec<_> = r
        .phases
        .iter()
        .filter_map(|p| Some((p, p.memory?)))
        .collect();
    if !held.is_empty() {
        let _ = writeln!(
            out,
            "\n| phase | proxy RSS before KiB | held KiB | after close KiB | fds before | fds held | KiB per session |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for (p, m) in held {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {:.1} |",
                p.name,
                m.rss_kib_before,
                m.rss_kib_held,
                m.rss_kib_after,
                m.fds_before,
                m.fds_held,
                m.kib_per_session
            );
        }
    }
    out
}

const W: f64 = 820.0;
const H: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// The latency distribution of every phase with samples, as CDFs on a log-scaled time axis
/// (cold starts and warm connects differ by orders of magnitude).
pub fn svg(r: &Results) -> String {
    let series: Vec<(&str, Vec<f64>)> = r
        .phases
        .iter()
        .filter(|p| !p.samples_ms.is_empty())
        .map(|p| {
            let mut s = p.samples_ms.clone();
            s.sort_by(f64::total_cmp);
            (p.name.as_str(), s)
        })
        .collect();
    let all = series.iter().flat_map(|(_, s)| s.iter().copied());
    // No samples at all would leave the axis infinite and the tick loop below endless.
    let lo = all.clone().fold(f64::INFINITY, f64::min).clamp(0.01, 1e9);
    let hi = all.fold(0.0, f64::max).max(lo * 10.0);
    // Decade bounds so ticks fall on 1-2-5 values.
    let (lo, hi) = (
        10f64.powf(lo.log10().floor()),
        10f64.powf(hi.log10().ceil()),
    );
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |v: f64| LEFT + (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()) * pw;
    let y = |f: f64| TOP + (1.0 - f) * ph;

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">pgwake-bench: client latency, connect to first result (CDF, {} CPUs)</text>"#,
        LEFT + pw / 2.0,
        r.machine.cpus
    );
    // Grid at 1-2-5 steps; labels on 2 and 5 too only when few decades leave room for them.
    let label_all = (hi / lo).log10() <= 3.0;
    let mut decade = lo;
    while decade <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v > hi * 1.0001 {
                break;
            }
            let xv = x(v);
            let _ = writeln!(
                o,
                r##"<line x1="{xv:.1}" y1="{TOP}" x2="{xv:.1}" y2="{}" stroke="#ddd"/>"##,
                TOP + ph
            );
            if m == 1.0 || label_all {
                let _ = writeln!(
                    o,
                    r#"<text x="{xv:.1}" y="{}" text-anchor="middle">{}</text>"#,
                    TOP + ph + 16.0,
                    fmt_ms(v)
                );
            }
        }
        decade *= 10.0;
    }
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let yv = y(f);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{yv:.1}" x2="{}" y2="{yv:.1}" stroke="#ddd"/>"##,
            LEFT + pw
        );
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{:.0}%</text>"#,
            LEFT - 6.0,
            yv + 4.0,
            f * 100.0
        );
    }
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">latency (ms, log scale)</text>"#,
        LEFT + pw / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        o,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">share of clients at or below</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    // One step line per phase.
    for (i, (name, s)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = s.len() as f64;
        let mut pts = format!("{:.1},{:.1}", x(s[0]), y(0.0));
        for (j, v) in s.iter().enumerate() {
            let _ = write!(
                pts,
                " {:.1},{:.1} {:.1},{:.1}",
                x(*v),
                y(j as f64 / n),
                x(*v),
                y((j + 1) as f64 / n)
            );
        }
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{pts}"/>"#
        );
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 14.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/>"#,
            lx + 22.0
        );
        let p50 = s[((s.len() as f64 * 0.5).ceil() as usize).clamp(1, s.len()) - 1];
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}">{} (p50 {})</text>"#,
            lx + 28.0,
            ly + 4.0,
            escape(name),
            fmt_ms(p50)
        );
    }
    o.push_str("</svg>\n");
    o
}

fn fmt_ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}s", trim(v / 1000.0))
    } else {
        format!("{}ms", trim(v))
    }
}

/// Three significant digits at most, without trailing zeros: 0.25, 4.15, 59.2, 181, 4200.
fn trim(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phases::{Machine, PhaseResult, Summary};

    fn results() -> Results {
        let phase = |name: &str, samples: Vec<f64>| PhaseResult {
            name: name.into(),
            what: String::new(),
            summary: Summary::of(&samples),
            samples_ms: samples,
            errors: 0,
            wall_ms: None,
            queries_per_sec: None,
            starts: Some(1),
            memory: None,
        };
        Results {
            machine: Machine {
                cpus: 2,
                cpu_model: "x".into(),
                kernel: "Linux".into(),
                postgres: "15".into(),
            },
            mode: "in-process".into(),
            phases: vec![
                phase("cold", vec![120.0, 150.0, 400.0]),
                phase("warm", vec![1.5, 2.0, 2.5, 9.0]),
            ],
        }
    }

    #[test]
    fn table_has_a_row_per_phase() {
        let t = table(&results());
        assert!(t.contains("| cold | 3 | 150.00 |"), "{t}");
        assert!(t.contains("| warm | 4 | 2.00 |"), "{t}");
    }

    #[test]
    fn svg_without_samples_is_still_drawn() {
        let mut r = results();
        r.phases.iter_mut().for_each(|p| p.samples_ms.clear());
        assert!(svg(&r).ends_with("</svg>\n"));
    }

    #[test]
    fn short_numbers() {
        assert_eq!(fmt_ms(180.99), "181ms");
        assert_eq!(fmt_ms(59.16), "59.2ms");
        assert_eq!(fmt_ms(4.15), "4.15ms");
        assert_eq!(fmt_ms(4197.4), "4.2s");
        assert_eq!(fmt_ms(1000.0), "1s");
    }

    #[test]
    fn svg_is_well_formed_and_has_a_line_per_phase() {
        let s = svg(&results());
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("cold (p50 150ms)"), "{s}");
        assert!(s.contains("warm (p50 2ms)"), "{s}");
        // Axis spans the decades around the data: 1 ms .. 1 s.
        assert!(s.contains(">1ms<") && s.contains(">1s<"), "{s}");
    }
}
