// Cargo applies a package's build-dependencies only when it has a build script; this empty one
// lets the build-dependencies above unify the features of the members' build scripts too.
fn main() {}
