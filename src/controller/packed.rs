//! JSON kept compressed in memory: LZ4 against a dictionary of what such JSON has in common (keys,
//! defaults, the names and ids every object of a cache shares), so that a cache of thousands of
//! similar objects keeps little more than what tells them apart. A ClientApplication with its status
//! takes about 1.1 KB as JSON and 100 to 200 bytes packed; a microsecond unpacks it.

use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretBox, SecretString};

/// JSON packed against a dictionary, which its holder keeps: what was packed with a dictionary
/// unpacks only with the same one. The bytes are wiped when dropped, as are the buffers used on the
/// way (a view's JSON holds a client's secret, and LZ4 keeps what it cannot compress as is).
pub struct Packed {
    bytes: SecretBox<[u8]>,
    len: usize,
}

impl Packed {
    pub fn pack(json: &str, dictionary: &[u8]) -> Self {
        use lz4_flex::block::{compress_into_with_dict, get_maximum_output_size};
        let mut buffer = Zeroizing::new(vec![0u8; get_maximum_output_size(json.len())]);
        let size = compress_into_with_dict(json.as_bytes(), &mut buffer, dictionary)
            .expect("the buffer has LZ4's maximum output size");
        // An exact copy: shrinking the buffer could move its bytes and leave the old ones unwiped.
        Self { bytes: SecretBox::new(buffer[..size].into()), len: json.len() }
    }

    pub fn unpack(&self, dictionary: &[u8]) -> SecretString {
        let mut json = vec![0u8; self.len];
        let unpacked = lz4_flex::block::decompress_into_with_dict(self.bytes.expose_secret(), &mut json, dictionary);
        assert_eq!(unpacked.ok(), Some(self.len), "packed JSON unpacks with the dictionary it was packed with");
        SecretString::from(String::from_utf8(json).expect("packed from a str"))
    }

    /// Its size in memory (for tests and figures).
    #[cfg(test)]
    pub fn packed_len(&self) -> usize {
        self.bytes.expose_secret().len()
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed({} bytes of JSON)", self.len)
    }
}

impl Clone for Packed {
    fn clone(&self) -> Self {
        Self { bytes: SecretBox::new(self.bytes.expose_secret().into()), len: self.len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_comes_back_as_it_went_in_and_similar_json_packs_small() {
        let object = |name: &str| {
            format!(
                r#"{{"spec":{{"access":[{{"policyRef":{{"name":"{name}-policy"}}}}],"secret":{{"keys":{{"baseUrl":"MEDPLUM_BASE_URL"}}}}}},"status":{{"conditions":[{{"type":"Ready","status":"True","reason":"Reconciled","message":"credentials in Secret {name} work"}}]}}}}"#
            )
        };
        let dictionary = object("first").into_bytes();
        let json = object("billing-service");
        let packed = Packed::pack(&json, &dictionary);
        assert_eq!(packed.unpack(&dictionary).expose_secret(), json);
        assert!(packed.packed_len() * 4 < json.len(), "{} of {}", packed.packed_len(), json.len());
        // Without anything in common, it still comes back.
        let odd = r#"{"a":"\u00e9\u4e2d","b":[1,2,3]}"#;
        assert_eq!(Packed::pack(odd, &dictionary).clone().unpack(&dictionary).expose_secret(), odd);
        assert_eq!(Packed::pack("", b"").unpack(b"").expose_secret(), "");
    }
}
