//! Rebuild when a migration is added (`sqlx::migrate!` embeds the folder at compile time) and
//! when the admin UI is built anew (release builds embed `admin-ui/dist`).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    if std::path::Path::new("admin-ui/dist").exists() {
        println!("cargo:rerun-if-changed=admin-ui/dist");
    } else {
        // Not built yet: watch for `dist` to appear.
        println!("cargo:rerun-if-changed=admin-ui");
    }
}
