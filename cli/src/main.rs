//! `dvm`: the front door of DVM.
//!
//! Exit codes are a contract scripts rely on: 0 success, 1 a user error (bad input, missing file,
//! a program that faulted), 2 an internal error (a bug in DVM; the message asks for a report).
//! Every subcommand returns `Result<(), Failure>` and `main` alone turns that into a code.

use clap::{Parser, Subcommand, ValueEnum};
use dvm_engine::{asm, disasm, image, isa};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "dvm",
    version,
    about = "DVM: a datacenter-scale virtual machine for DISA programs",
    long_about = "DVM runs DISA programs (a 64-bit memory-to-memory instruction set) as many \
                  runners over one snapshotted memory.\n\nThis build provides the DISA toolchain: \
                  assemble text to images, disassemble images back to text, and print the ISA.",
    after_help = "Exit codes: 0 success, 1 bad input or a failed program, 2 internal error.\n\
                  Docs: docs/DISA.md (the instruction set), README.md (getting started)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Assemble a .dasm file into an image.
    #[command(
        after_help = "Errors are reported as FILE:LINE:COLUMN with the offending text; \
                            all errors in the file are listed (up to 50)."
    )]
    Asm {
        /// Assembly source (see docs/DISA.md for the syntax).
        input: PathBuf,
        /// Output image [default: the input with the extension `.disa`].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Image format: `elf` keeps sections and symbols (used in fault reports); `flat` is
        /// the original toolchain's pure-code format (no data sections, no symbols).
        #[arg(long, value_enum, default_value_t = FormatArg::Elf)]
        format: FormatArg,
    },
    /// Disassemble an image (flat or ELF) into assembly text that reassembles to the same bytes.
    Disasm {
        /// Image file.
        image: PathBuf,
        /// Write the listing here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the instruction set table (the same table the toolchain is generated from).
    Isa,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Flat,
    Elf,
}

impl From<FormatArg> for image::Format {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::Flat => image::Format::Flat,
            FormatArg::Elf => image::Format::Elf,
        }
    }
}

/// Why a command failed. Internal errors (exit 2) are panics, caught in `main`.
enum Failure {
    /// Bad input or a failed program: the message explains; exit 1.
    User(String),
}

fn user(message: impl Into<String>) -> Failure {
    Failure::User(message.into())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .map_err(|err| user(format!("cannot read {what} `{}`: {err}", path.display())))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::write(path, bytes)
        .map_err(|err| user(format!("cannot write `{}`: {err}", path.display())))
}

fn cmd_asm(input: &Path, output: Option<PathBuf>, format: FormatArg) -> Result<(), Failure> {
    let bytes = read_file(input, "assembly source")?;
    let source = String::from_utf8(bytes).map_err(|err| {
        user(format!(
            "`{}` is not UTF-8 text (invalid byte at offset {})",
            input.display(),
            err.utf8_error().valid_up_to()
        ))
    })?;
    let name = input.display().to_string();
    let image = asm::assemble(&name, &source).map_err(|errors| user(errors.to_string()))?;
    let format = image::Format::from(format);
    // Validate exactly as a later load will, so a written image always loads.
    let loaded = image::validate(format, image).map_err(|err| user(format!("{name}: {err}")))?;
    let bytes =
        image::write(&loaded.image, format).map_err(|err| user(format!("{name}: {err}")))?;
    let output = output.unwrap_or_else(|| input.with_extension("disa"));
    write_file(&output, &bytes)?;
    eprintln!(
        "assembled {name}: {} instructions, {} bytes of code, {} image `{}` ({} bytes)",
        loaded.code.len(),
        loaded.code_len_bytes(),
        format.name(),
        output.display(),
        bytes.len()
    );
    Ok(())
}

fn cmd_disasm(path: &Path, output: Option<PathBuf>) -> Result<(), Failure> {
    let bytes = read_file(path, "image")?;
    let loaded = image::load(&bytes).map_err(|err| user(format!("{}: {err}", path.display())))?;
    let text = disasm::disassemble(&loaded);
    match output {
        Some(output) => write_file(&output, text.as_bytes()),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Asm {
            input,
            output,
            format,
        } => cmd_asm(&input, output, format),
        Command::Disasm { image, output } => cmd_disasm(&image, output),
        Command::Isa => {
            print!("{}", isa::markdown_tables());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let code = match err.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    std::panic::set_hook(Box::new(|info| {
        eprintln!(
            "dvm: internal error: {info}\nThis is a bug in DVM, not in your program; please report it with the command line."
        );
    }));
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(Failure::User(message))) => {
            let message = message.trim_end();
            // Assembler diagnostics carry their own `error:` headers.
            if message.starts_with("error:") {
                eprintln!("{message}");
            } else {
                eprintln!("error: {message}");
            }
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(2),
    }
}
