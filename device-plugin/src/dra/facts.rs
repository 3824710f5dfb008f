//! What a ResourceSlice says about a stick beyond discovery's [`StickInfo`]: its firmware
//! (`bcdDevice`) and model. Both come from sysfs, which is readable without opening the
//! device: the `bcdDevice` and `product` attributes where the kernel provides them, else the
//! raw `descriptors` file (its device descriptor holds bcdDevice at bytes 12–13, little
//! endian). Parsing is pure; [`read`] only reads the files.

use std::path::Path;

use crate::inventory::StickInfo;

/// Longest model text published (the API's limit for a string attribute is 64 bytes).
const MAX_MODEL_LEN: usize = 64;

/// A stick as a ResourceSlice describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickFacts {
    /// The inventory's stable ID of the stick.
    pub id: String,
    /// What discovery reported.
    pub info: StickInfo,
    /// Firmware version from bcdDevice, e.g. `1.1.0` for 0x0101 (a semantic version, so that
    /// CEL can compare it).
    pub firmware: Option<String>,
    /// The product string, e.g. `Nitrokey HSM`.
    pub model: Option<String>,
}

/// bcdDevice as a semantic version: 0xJJMN reads as `JJ.MN` in binary-coded decimal, so
/// 0x0101 is firmware 1.1 (published `1.1.0`). `None` when the value is not valid BCD.
pub fn firmware_version(bcd: u16) -> Option<String> {
    let digit = |shift: u16| {
        let d = (bcd >> shift) & 0xf;
        (d <= 9).then_some(d)
    };
    let (a, b, c, d) = (digit(12)?, digit(8)?, digit(4)?, digit(0)?);
    Some(format!("{}.{}.0", a * 10 + b, c * 10 + d))
}

/// bcdDevice from the `bcdDevice` attribute text (four hex digits).
pub fn parse_bcd_attribute(text: &str) -> Option<u16> {
    let text = text.trim();
    (text.len() == 4)
        .then(|| u16::from_str_radix(text, 16).ok())
        .flatten()
}

/// bcdDevice from the raw descriptors (the device descriptor comes first).
pub fn bcd_from_descriptors(bytes: &[u8]) -> Option<u16> {
    // bLength 18, bDescriptorType 1 (device).
    if bytes.len() < 18 || bytes[0] != 18 || bytes[1] != 1 {
        return None;
    }
    Some(u16::from_le_bytes([bytes[12], bytes[13]]))
}

/// The model: the product string if it is printable and short enough, else the known name of
/// the product ID.
pub fn model(product_attribute: Option<&str>, vendor: u16, product: u16) -> Option<String> {
    let from_sysfs = product_attribute
        .map(str::trim)
        .filter(|p| !p.is_empty() && p.len() <= MAX_MODEL_LEN)
        .filter(|p| p.chars().all(|c| !c.is_control()));
    match (from_sysfs, vendor, product) {
        (Some(p), _, _) => Some(p.to_owned()),
        (None, 0x20a0, 0x4230) => Some("Nitrokey HSM".to_owned()),
        _ => None,
    }
}

/// Reads the facts of a stick from its sysfs directory (`dir`).
pub fn read(id: &str, info: &StickInfo, dir: &Path) -> StickFacts {
    let bcd = std::fs::read_to_string(dir.join("bcdDevice"))
        .ok()
        .and_then(|t| parse_bcd_attribute(&t))
        .or_else(|| {
            std::fs::read(dir.join("descriptors"))
                .ok()
                .and_then(|b| bcd_from_descriptors(&b))
        });
    let product = std::fs::read(dir.join("product"))
        .ok()
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(256)]).into_owned());
    StickFacts {
        id: id.to_owned(),
        info: info.clone(),
        firmware: bcd.and_then(firmware_version),
        model: model(product.as_deref(), info.vendor, info.product),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcd_reads_as_a_version() {
        assert_eq!(firmware_version(0x0101).as_deref(), Some("1.1.0"));
        assert_eq!(firmware_version(0x0412).as_deref(), Some("4.12.0"));
        assert_eq!(firmware_version(0x1099).as_deref(), Some("10.99.0"));
        assert_eq!(firmware_version(0x010a), None, "not BCD");
        assert_eq!(parse_bcd_attribute("0101\n"), Some(0x0101));
        assert_eq!(parse_bcd_attribute("xyz"), None);
        assert_eq!(parse_bcd_attribute("10101"), None);
    }

    #[test]
    fn bcd_from_the_device_descriptor() {
        let descriptor = [
            0x12, 0x01, 0x00, 0x02, 0, 0, 0, 0x40, 0xa0, 0x20, 0x30, 0x42, 0x01, 0x01, 1, 2, 3, 1,
        ];
        assert_eq!(bcd_from_descriptors(&descriptor), Some(0x0101));
        assert_eq!(bcd_from_descriptors(&descriptor[..10]), None);
        assert_eq!(bcd_from_descriptors(&[9u8; 18]), None);
    }

    #[test]
    fn model_from_sysfs_or_the_product_id() {
        assert_eq!(
            model(Some("Nitrokey HSM 2\n"), 0x20a0, 0x4230).as_deref(),
            Some("Nitrokey HSM 2")
        );
        assert_eq!(model(None, 0x20a0, 0x4230).as_deref(), Some("Nitrokey HSM"));
        assert_eq!(
            model(Some("bad\u{7}"), 0x20a0, 0x4230).as_deref(),
            Some("Nitrokey HSM")
        );
        assert_eq!(model(Some(&"x".repeat(65)), 0x1234, 0x5678), None);
        assert_eq!(model(None, 0x1234, 0x5678), None);
    }
}
