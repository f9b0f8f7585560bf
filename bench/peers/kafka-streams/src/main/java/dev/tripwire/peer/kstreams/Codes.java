package dev.tripwire.peer.kstreams;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * The ISO 4217 currencies and ISO 3166-1 alpha-2 countries that Tripwire's source
 * accepts. Read from a copy of {@code connectors/src/codes.rs} that the build puts on the
 * class path (so the lists cannot drift from the Rust source), as lookup tables indexed
 * by the letters.
 */
final class Codes {
    /** Indexed by (c0-'A')*676 + (c1-'A')*26 + (c2-'A'). */
    private static final boolean[] CURRENCY = new boolean[26 * 26 * 26];
    /** Indexed by (c0-'A')*26 + (c1-'A'). */
    private static final boolean[] COUNTRY = new boolean[26 * 26];

    static {
        String rs;
        try (InputStream in = Codes.class.getResourceAsStream("/tripwire/codes.rs")) {
            if (in == null) {
                throw new IllegalStateException("tripwire/codes.rs is not on the class path (see pom.xml)");
            }
            rs = new String(in.readAllBytes(), StandardCharsets.UTF_8);
        } catch (IOException e) {
            throw new IllegalStateException(e);
        }
        int currencies = 0;
        for (String c : list(rs, "CURRENCIES")) {
            CURRENCY[(c.charAt(0) - 'A') * 676 + (c.charAt(1) - 'A') * 26 + (c.charAt(2) - 'A')] = true;
            currencies++;
        }
        int countries = 0;
        for (String c : list(rs, "COUNTRIES")) {
            COUNTRY[(c.charAt(0) - 'A') * 26 + (c.charAt(1) - 'A')] = true;
            countries++;
        }
        if (currencies < 100 || countries < 200) {
            throw new IllegalStateException("could not read the code lists from codes.rs");
        }
    }

    private static String[] list(String rs, String name) {
        Matcher m = Pattern.compile("const " + name + ":\\s*&str\\s*=\\s*\"([^\"]*)\"", Pattern.DOTALL).matcher(rs);
        if (!m.find()) {
            throw new IllegalStateException("no " + name + " in codes.rs");
        }
        return m.group(1).replace("\\", " ").trim().split("\\s+");
    }

    private Codes() {}

    private static int letter(byte b) {
        return b >= 'A' && b <= 'Z' ? b - 'A' : -1;
    }

    /** The bytes are UTF-8; a code is valid iff it is exactly 3 listed upper-case letters. */
    static boolean currency(byte[] utf8, int len) {
        if (len != 3) return false;
        int a = letter(utf8[0]), b = letter(utf8[1]), c = letter(utf8[2]);
        return a >= 0 && b >= 0 && c >= 0 && CURRENCY[a * 676 + b * 26 + c];
    }

    /** The packed country (0..675), or -1 if it is not a listed alpha-2 code. */
    static int country(byte[] utf8, int len) {
        if (len != 2) return -1;
        int a = letter(utf8[0]), b = letter(utf8[1]);
        if (a < 0 || b < 0) return -1;
        int packed = a * 26 + b;
        return COUNTRY[packed] ? packed : -1;
    }
}
