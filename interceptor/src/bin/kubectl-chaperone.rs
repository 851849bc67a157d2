//! `kubectl chaperone`: the approvers' kubectl plugin (see
//! `chaperone::approval::cli`). Installed on PATH as `kubectl-chaperone`,
//! kubectl runs it for `kubectl chaperone ...`.

fn main() -> std::process::ExitCode {
    chaperone::approval::cli::main()
}
