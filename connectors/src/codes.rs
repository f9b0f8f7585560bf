//! ISO 4217 currency and ISO 3166-1 alpha-2 country codes that the source accepts.

use std::sync::OnceLock;

/// Active ISO 4217 alphabetic currency codes.
const CURRENCIES: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB \
BRL BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD \
FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR \
KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR \
MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK \
SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES \
VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG";

/// ISO 3166-1 alpha-2 country codes.
const COUNTRIES: &str =
    "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ \
BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ \
DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT \
GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY \
KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX \
MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS \
RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN \
TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// The codes of `list` (`N` capital letters each) as a bitmap indexed by the
/// code read as a base-26 number.
///
/// Checked for every record: a `HashSet`'s SipHash was a twentieth of the
/// source's time; a bit is one load of a table that stays in cache (85
/// bytes for countries, 2.2 KB for currencies).
fn bitmap<const N: usize>(list: &'static str) -> Vec<u64> {
    let mut bits = vec![0u64; 26usize.pow(N as u32).div_ceil(64)];
    for code in list.split_whitespace() {
        let code: [u8; N] = code.as_bytes().try_into().expect("codes of N letters");
        let i = index(&code).expect("capital letters");
        bits[i / 64] |= 1 << (i % 64);
    }
    bits
}

/// `code` read as a base-26 number, if it is capital letters only.
fn index<const N: usize>(code: &[u8; N]) -> Option<usize> {
    code.iter()
        .try_fold(0usize, |i, &c| c.is_ascii_uppercase().then(|| i * 26 + (c - b'A') as usize))
}

/// `code` as bytes if `bits` holds it.
fn lookup<const N: usize>(bits: &[u64], code: &str) -> Option<[u8; N]> {
    let b: [u8; N] = code.as_bytes().try_into().ok()?;
    let i = index(&b)?;
    (bits[i / 64] >> (i % 64) & 1 == 1).then_some(b)
}

/// `code` as bytes if it is an active ISO 4217 currency.
pub fn currency(code: &str) -> Option<[u8; 3]> {
    static BITS: OnceLock<Vec<u64>> = OnceLock::new();
    lookup(BITS.get_or_init(|| bitmap::<3>(CURRENCIES)), code)
}

/// `code` as bytes if it is an ISO 3166-1 alpha-2 country.
pub fn country(code: &str) -> Option<[u8; 2]> {
    static BITS: OnceLock<Vec<u64>> = OnceLock::new();
    lookup(BITS.get_or_init(|| bitmap::<2>(COUNTRIES)), code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_pass_and_unknown_or_malformed_ones_do_not() {
        assert_eq!(currency("EUR"), Some(*b"EUR"));
        assert_eq!(country("DE"), Some(*b"DE"));
        assert_eq!(currency("XYZ"), None);
        assert_eq!(currency("eur"), None);
        assert_eq!(country("ZZ"), None);
        assert_eq!(country("DEU"), None);
        assert_eq!(country(""), None);
    }

    /// Every code of the lists passes, and of all the strings of two or three
    /// bytes over capital letters and their neighbours in ASCII, exactly those.
    #[test]
    fn exactly_the_listed_codes_pass() {
        let listed = |list: &str| -> std::collections::HashSet<String> {
            list.split_whitespace().map(str::to_owned).collect()
        };
        let (currencies, countries) = (listed(CURRENCIES), listed(COUNTRIES));
        let alphabet: Vec<u8> = (b'@'..=b'[').chain(b'`'..=b'{').collect();
        for &a in &alphabet {
            for &b in &alphabet {
                let two = String::from_utf8(vec![a, b]).unwrap();
                assert_eq!(country(&two).is_some(), countries.contains(&two), "{two}");
                for &c in &alphabet {
                    let three = String::from_utf8(vec![a, b, c]).unwrap();
                    assert_eq!(currency(&three).is_some(), currencies.contains(&three), "{three}");
                }
            }
        }
        assert_eq!(currencies.len(), CURRENCIES.split_whitespace().count());
        assert!(currency("ÉUR").is_none() && country("É").is_none());
    }
}
