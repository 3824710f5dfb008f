//! Generates the kubelet device-plugin API (client and server) from the checked-in .proto file.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "deviceplugin/v1beta1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &["."])?;
    Ok(())
}
