//! Line charts as SVG, through `plotters`' SVG backend: the loss curve `megabyte train` writes
//! beside its checkpoint, and the forward-time scaling plot of the model bench
//! (`docs/scaling.svg`).

use plotters::prelude::*;

/// One line of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    /// (x, y) in data units; on a log axis, positive.
    pub points: &'a [(f64, f64)],
    /// Mark each point with a dot as well.
    pub dots: bool,
}

/// A chart's title, axis labels and axis scales.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
}

const COLORS: [RGBColor; 3] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0xd6, 0x27, 0x28),
];

/// The chart as an SVG document, 720 × 420, one colour per series, a legend naming them.
/// Errors are the drawing backend's, as text.
pub fn line_chart_svg(chart: &Chart, series: &[Series]) -> Result<String, String> {
    let tx = |v: f64| if chart.log_x { v.log10() } else { v };
    let ty = |v: f64| if chart.log_y { v.log10() } else { v };
    let all = || series.iter().flat_map(|s| s.points.iter());
    let range = |f: &dyn Fn(&(f64, f64)) -> f64| {
        let (lo, hi) = all()
            .map(f)
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
        match hi - lo {
            d if d.is_nan() || d < 0.0 => (0.0, 1.0),
            d if d < 1e-9 => (lo - 0.5, hi + 0.5),
            _ => (lo, hi),
        }
    };
    let (x0, x1) = range(&|p| tx(p.0));
    let (y0, y1) = range(&|p| ty(p.1));
    let unlog = |log: bool, v: f64| if log { 10f64.powf(v) } else { v };
    let fx = |v: &f64| format!("{}", three_digits(unlog(chart.log_x, *v)));
    let fy = |v: &f64| format!("{}", three_digits(unlog(chart.log_y, *v)));
    let mut svg = String::new();
    {
        let err = |e: DrawingAreaErrorKind<_>| e.to_string();
        let root = SVGBackend::with_string(&mut svg, (720, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(chart.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc(chart.x_label)
            .y_desc(chart.y_label)
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .draw()
            .map_err(err)?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let line = s.points.iter().map(|&(x, y)| (tx(x), ty(y)));
            c.draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            if s.dots {
                c.draw_series(line.map(|p| Circle::new(p, 3, color.filled())))
                    .map_err(err)?;
            }
        }
        c.configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// `v` rounded to three significant digits, for axis labels.
fn three_digits(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(2 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_names_its_series_and_labels() {
        let pts = [(1.0, 2.0), (10.0, 4.0), (100.0, 3.0)];
        let chart = Chart {
            title: "bits per byte",
            x_label: "step",
            y_label: "bits",
            log_x: true,
            log_y: false,
        };
        let series = [
            Series {
                name: "training",
                points: &pts,
                dots: false,
            },
            Series {
                name: "validation",
                points: &pts[1..],
                dots: true,
            },
        ];
        let svg = line_chart_svg(&chart, &series).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        for text in ["bits per byte", "step", "bits", "training", "validation"] {
            assert!(svg.contains(text), "{text} missing");
        }
        // Dots for the validation series' two points only.
        assert_eq!(svg.matches("<circle").count(), 2, "{svg}");
    }

    #[test]
    fn an_empty_or_flat_chart_still_draws() {
        let chart = Chart {
            title: "t",
            x_label: "x",
            y_label: "y",
            log_x: false,
            log_y: false,
        };
        assert!(line_chart_svg(&chart, &[]).is_ok());
        let flat = [(3.0, 1.0), (3.0, 1.0)];
        assert!(line_chart_svg(
            &chart,
            &[Series {
                name: "a",
                points: &flat,
                dots: true
            }]
        )
        .is_ok());
    }

    #[test]
    fn labels_have_three_significant_digits() {
        assert_eq!(three_digits(1234.5), 1230.0);
        assert_eq!(three_digits(0.012345), 0.0123);
        assert_eq!(three_digits(0.0), 0.0);
    }
}
