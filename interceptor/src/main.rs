fn main() -> std::process::ExitCode {
    chaperone::cli::main()
}
