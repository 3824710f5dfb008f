//! Generates the kubelet's device-plugin API, pod-resources API, plugin registration API and
//! DRA node service (clients and servers) from the checked-in .proto files.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "deviceplugin/v1beta1/api.proto",
        "podresources/v1/api.proto",
        "pluginregistration/v1/api.proto",
        "dra/v1/api.proto",
        "dra/v1beta1/api.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["."])?;
    Ok(())
}
