//! `ferrovisor`: the command-line front end.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let code = cli::main();
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
