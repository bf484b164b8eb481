//! `dvm run --profile` (writing the samples) and `dvm profile` (reading them, or any `perf
//! script` text): the widest frames, flame graphs and folded stacks.

use crate::{read_file, user, write_file, Failure};
use dvm_engine::image::LoadedImage;
use dvm_engine::vm::Report;
use dvm_perf::flame;
use dvm_perf::profile::{perf_script, Header, Symbols};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// The profile: `perf script` text.
    file: PathBuf,
    /// Draw the flame graph into this SVG file.
    #[arg(long, value_name = "SVG")]
    svg: Option<PathBuf>,
    /// Write the folded stacks (`frame;frame;frame count`) here, `-` for stdout.
    #[arg(long, value_name = "FILE")]
    folded: Option<PathBuf>,
    /// How many of the widest frames to list.
    #[arg(long, value_name = "N", default_value_t = 15)]
    top: usize,
    /// List frames by their own samples (innermost frame) rather than by width: what a host
    /// profile's hot functions are, below the thread start-up frames every stack shares.
    #[arg(long)]
    by_self: bool,
}

/// Where a run's profile goes, opened before the run so a bad path fails before any work.
pub struct Output {
    path: PathBuf,
    file: File,
    svg: Option<(PathBuf, File)>,
    symbols: Symbols,
    program: String,
}

fn create(path: &Path, what: &str) -> Result<File, Failure> {
    File::create(path)
        .map_err(|err| user(format!("{what}: cannot create `{}`: {err}", path.display())))
}

impl Output {
    pub fn create(
        path: &Path,
        svg: Option<&Path>,
        image: &LoadedImage,
        program: &Path,
    ) -> Result<Output, Failure> {
        let dso = program.file_name().map_or_else(
            || program.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        Ok(Output {
            path: path.to_path_buf(),
            file: create(path, "--profile")?,
            svg: svg
                .map(|svg| create(svg, "--profile-svg").map(|file| (svg.to_path_buf(), file)))
                .transpose()?,
            symbols: Symbols::new(
                &dso,
                image
                    .image
                    .symbols
                    .iter()
                    .map(|symbol| (symbol.name.clone(), symbol.addr))
                    .chain(local_labels(program)),
            ),
            program: dso,
        })
    }

    /// Writes the run's samples, and the flame graph if asked; says where on stderr.
    pub fn write(self, report: &Report, hz: u32, nodes: u32) -> Result<(), Failure> {
        let mut samples = report.profile.clone();
        let header = Header {
            program: &self.program,
            hz,
            nodes,
        };
        let text = perf_script(&header, &self.symbols, &mut samples);
        let mut file = self.file;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .map_err(|err| user(format!("cannot write `{}`: {err}", self.path.display())))?;
        let folded = flame::fold(text.as_bytes())
            .map_err(|err| user(format!("cannot fold the profile: {err}")))?;
        let (all, widths) = flame::widths(&folded);
        let widest = widths
            .iter()
            .find(|w| !w.frame.starts_with('['))
            .map_or_else(String::new, |w| {
                format!(
                    "; widest DISA frame {} ({:.0}%)",
                    w.frame,
                    percent(w.total, all)
                )
            });
        eprintln!(
            "dvm: profile: {} samples at {hz} Hz per worker written to {}{widest}{}",
            samples.len(),
            self.path.display(),
            if report.profile_dropped > 0 {
                format!(
                    " ({} samples dropped: a worker's buffer was full)",
                    report.profile_dropped
                )
            } else {
                String::new()
            }
        );
        if let Some((path, file)) = self.svg {
            flame::svg(
                &folded,
                &format!("{} (DVM guest profile)", self.program),
                file,
            )
            .map_err(|err| user(format!("cannot write `{}`: {err}", path.display())))?;
            eprintln!("dvm: profile: flame graph written to {}", path.display());
        }
        Ok(())
    }
}

/// A `.dasm` program's local labels (an image has none), so the profile shows loops.
pub(crate) fn local_labels(program: &Path) -> Vec<(String, u64)> {
    if program.extension().is_none_or(|ext| ext != "dasm") {
        return Vec::new();
    }
    std::fs::read_to_string(program).map_or_else(
        |_| Vec::new(),
        |source| dvm_engine::asm::local_code_labels(&program.display().to_string(), &source),
    )
}

fn percent(part: u64, all: u64) -> f64 {
    if all == 0 {
        0.0
    } else {
        part as f64 * 100.0 / all as f64
    }
}

pub fn cmd_profile(args: &ProfileArgs) -> Result<(), Failure> {
    let text = read_file(&args.file, "profile")?;
    let folded = flame::fold(&text).map_err(|err| {
        user(format!(
            "`{}` is not `perf script` text: {err}",
            args.file.display()
        ))
    })?;
    if folded.is_empty() {
        return Err(user(format!(
            "`{}` has no samples (is it `perf script` text?)",
            args.file.display()
        )));
    }
    let (all, mut widths) = flame::widths(&folded);
    if args.by_self {
        widths.sort_by(|a, b| b.own.cmp(&a.own).then(a.frame.cmp(&b.frame)));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} frames (share of the samples, weighted by their periods):",
        args.file.display(),
        if args.by_self { "hottest" } else { "widest" }
    );
    let _ = writeln!(out, "  {:>7} {:>7}  frame", "total", "self");
    for w in widths.iter().take(args.top) {
        let _ = writeln!(
            out,
            "  {:>6.1}% {:>6.1}%  {}",
            percent(w.total, all),
            percent(w.own, all),
            w.frame
        );
    }
    print!("{out}");
    if let Some(path) = &args.folded {
        let mut text = folded.join("\n");
        text.push('\n');
        if path.as_os_str() == "-" {
            print!("{text}");
        } else {
            write_file(path, text.as_bytes())?;
            eprintln!("dvm: folded stacks written to {}", path.display());
        }
    }
    if let Some(path) = &args.svg {
        let title = args.file.file_name().map_or_else(
            || args.file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let file = create(path, "--svg")?;
        flame::svg(&folded, &title, file)
            .map_err(|err| user(format!("cannot write `{}`: {err}", path.display())))?;
        eprintln!("dvm: flame graph written to {}", path.display());
    }
    Ok(())
}
