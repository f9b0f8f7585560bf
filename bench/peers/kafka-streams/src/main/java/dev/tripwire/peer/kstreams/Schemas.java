package dev.tripwire.peer.kstreams;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;
import org.apache.avro.Schema;

/**
 * The transaction writer schemas by Confluent schema id, from {@code schemas/manifest.json}
 * (copied onto the class path at build time, or read from {@code --schemas DIR}), and the
 * reader schema (the newest transaction version).
 */
final class Schemas {
    static final String TRANSACTION = "dev.tripwire.Transaction";

    /** Writer schemas of transactions by id; ids of other records are absent (rejected). */
    final Map<Integer, Schema> writers = new HashMap<>();
    final Schema reader;

    private Schemas(Map<Integer, Schema> writers, Schema reader) {
        this.writers.putAll(writers);
        this.reader = reader;
    }

    static Schemas load(String dir) throws IOException {
        JsonNode manifest = new ObjectMapper().readTree(read(dir, "manifest.json"));
        Map<Integer, Schema> writers = new HashMap<>();
        Schema newest = null;
        int newestVersion = -1;
        for (JsonNode s : manifest.get("schemas")) {
            Schema schema = new Schema.Parser().parse(new String(read(dir, s.get("file").asText()), "UTF-8"));
            if (!TRANSACTION.equals(schema.getFullName())) {
                continue;
            }
            writers.put(s.get("id").asInt(), schema);
            if (s.get("version").asInt() > newestVersion) {
                newestVersion = s.get("version").asInt();
                newest = schema;
            }
        }
        if (newest == null) {
            throw new IOException("no " + TRANSACTION + " schema in the manifest");
        }
        return new Schemas(writers, newest);
    }

    private static byte[] read(String dir, String file) throws IOException {
        if (dir != null) {
            return Files.readAllBytes(Path.of(dir, file));
        }
        try (InputStream in = Schemas.class.getResourceAsStream("/schemas/" + file)) {
            if (in == null) {
                throw new IOException("schemas/" + file + " is not on the class path (see pom.xml)");
            }
            return in.readAllBytes();
        }
    }
}
