//! `uswap plot TRACE -o OUT.png`: a PNG of a trace written with `--trace` (see `ops::plot`).

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A trace written by `uswap run --trace` or `uswap daemon --trace`.
    pub trace: PathBuf,
    /// The PNG to write [default: the trace's name with .png].
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub fn plot(args: PlotArgs) -> anyhow::Result<()> {
    let samples = crate::ops::trace::read(&args.trace)?;
    let out = args
        .output
        .unwrap_or_else(|| args.trace.with_extension("png"));
    crate::ops::plot::render(&samples, &out)?;
    let span = samples.last().map_or(0.0, |s| s.t_s);
    println!(
        "wrote {} ({} samples over {span:.1} s)",
        out.display(),
        samples.len()
    );
    Ok(())
}
