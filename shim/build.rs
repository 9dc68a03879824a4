//! Links the shim with `-z now`: every PLT entry is resolved at load time, so the agent thread
//! never enters the dynamic linker's lazy binding (which reads the loader's heap data, memory
//! the monitor may be evicting at that moment).
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,now");
}
