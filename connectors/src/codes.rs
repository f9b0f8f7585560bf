//! ISO 4217 currency and ISO 3166-1 alpha-2 country codes that the source accepts.

use std::collections::HashSet;
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

fn set<const N: usize>(list: &'static str) -> HashSet<[u8; N]> {
    list.split_whitespace().filter_map(|c| c.as_bytes().try_into().ok()).collect()
}

/// `code` as bytes if it is an active ISO 4217 currency.
pub fn currency(code: &str) -> Option<[u8; 3]> {
    static SET: OnceLock<HashSet<[u8; 3]>> = OnceLock::new();
    let b: [u8; 3] = code.as_bytes().try_into().ok()?;
    SET.get_or_init(|| set(CURRENCIES)).contains(&b).then_some(b)
}

/// `code` as bytes if it is an ISO 3166-1 alpha-2 country.
pub fn country(code: &str) -> Option<[u8; 2]> {
    static SET: OnceLock<HashSet<[u8; 2]>> = OnceLock::new();
    let b: [u8; 2] = code.as_bytes().try_into().ok()?;
    SET.get_or_init(|| set(COUNTRIES)).contains(&b).then_some(b)
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
}
