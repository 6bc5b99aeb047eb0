//! Training curves as a self-contained SVG: loss and top-1 accuracy per epoch.

use std::fmt::Write;

/// One epoch's numbers for the plot.
pub struct Point {
    /// Epoch number (1-based).
    pub epoch: f64,
    /// Training loss.
    pub train_loss: f64,
    /// Test loss.
    pub test_loss: f64,
    /// Training top-1 accuracy (fraction).
    pub train_top1: f64,
    /// Test top-1 accuracy (fraction).
    pub test_top1: f64,
}

fn panel(
    svg: &mut String,
    x0: f64,
    title: &str,
    pts: &[Point],
    series: [(&str, &str, fn(&Point) -> f64); 2],
    fixed: Option<(f64, f64)>,
) {
    let (w, h, pad) = (420.0, 260.0, 45.0);
    let max_e = pts.iter().map(|p| p.epoch).fold(1.0, f64::max);
    let vals: Vec<f64> = pts
        .iter()
        .flat_map(|p| [series[0].2(p), series[1].2(p)])
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = fixed.unwrap_or_else(|| (0.0, vals.iter().cloned().fold(1e-9, f64::max) * 1.05));
    let sx = |e: f64| x0 + pad + (e / max_e) * (w - 2.0 * pad);
    let sy = |v: f64| 20.0 + (h - pad - 20.0) * (1.0 - ((v - lo) / (hi - lo)).clamp(0.0, 1.0));
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="14" font-size="13" font-family="sans-serif">{title}</text>"##,
        x0 + pad
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{}" y="20" width="{}" height="{}" fill="none" stroke="#999"/>"##,
        x0 + pad,
        w - 2.0 * pad,
        h - pad - 20.0
    );
    for i in 0..=4 {
        let v = lo + (hi - lo) * i as f64 / 4.0;
        let y = sy(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end" font-family="sans-serif">{v:.3}</text>"##,
            x0 + pad,
            x0 + w - pad,
            x0 + pad - 4.0,
            y + 3.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" font-size="10" text-anchor="middle" font-family="sans-serif">epoch (of {max_e})</text>"##,
        x0 + w / 2.0,
        h - 12.0
    );
    for (k, (label, color, f)) in series.iter().enumerate() {
        let path: Vec<String> = pts
            .iter()
            .filter(|p| f(p).is_finite())
            .map(|p| format!("{:.1},{:.1}", sx(p.epoch), sy(f(p))))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"##,
            path.join(" ")
        );
        for p in pts.iter().filter(|p| f(p).is_finite()) {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"##,
                sx(p.epoch),
                sy(f(p))
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" font-size="11" fill="{color}" font-family="sans-serif">{label}</text>"##,
            x0 + w - pad - 70.0,
            36.0 + 14.0 * k as f64
        );
    }
}

/// Renders both panels.
pub fn render(pts: &[Point]) -> String {
    let mut svg = String::from(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="860" height="270" viewBox="0 0 860 270"><rect width="100%" height="100%" fill="white"/>"##,
    );
    svg.push('\n');
    panel(
        &mut svg,
        0.0,
        "loss",
        pts,
        [
            ("train", "#1f77b4", |p| p.train_loss),
            ("test", "#d62728", |p| p.test_loss),
        ],
        None,
    );
    panel(
        &mut svg,
        430.0,
        "top-1 accuracy",
        pts,
        [
            ("train", "#1f77b4", |p| p.train_top1),
            ("test", "#d62728", |p| p.test_top1),
        ],
        Some((0.0, 1.0)),
    );
    svg.push_str("</svg>\n");
    svg
}
