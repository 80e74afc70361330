//! Parses PTX files and reports their kernels (a quick check that a module decodes).
fn main() {
    for path in std::env::args().skip(1) {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(1);
            }
        };
        let t0 = std::time::Instant::now();
        match attnkit_emulator::Module::parse(&text) {
            Ok(m) => {
                let n = m.kernels().count();
                let regs: u32 = m.kernels().map(|k| k.num_regs()).max().unwrap_or(0);
                println!(
                    "{path}: {n} kernels, up to {regs} registers, parsed in {:.2?}",
                    t0.elapsed()
                );
            }
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(1);
            }
        }
    }
}
