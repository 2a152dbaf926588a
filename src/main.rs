//! The `elb-exporter` binary: everything lives in the library; see `elb_exporter::cli`.

fn main() -> std::process::ExitCode {
    elb_exporter::cli::main()
}
