// Writes every record of a topic as "partition offset timestamp key value-hex" lines on
// stdout, for check_dump.py (which decodes and checks independently of the peer).
// Run with the peer's jar on the class path (Java single-file source launch):
//   java -cp target/kstreams-peer.jar tools/Export.java BOOTSTRAP TOPIC > records.txt
import java.time.Duration;
import java.util.*;
import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.common.*;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class Export {
    public static void main(String[] a) throws Exception {
        Properties p = new Properties();
        p.put("bootstrap.servers", a[0]);
        p.put("isolation.level", "read_committed");
        try (KafkaConsumer<byte[], byte[]> c = new KafkaConsumer<>(p, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
            List<TopicPartition> tps = new ArrayList<>();
            for (PartitionInfo i : c.partitionsFor(a[1])) tps.add(new TopicPartition(a[1], i.partition()));
            c.assign(tps);
            c.seekToBeginning(tps);
            Map<TopicPartition, Long> end = c.endOffsets(tps);
            StringBuilder sb = new StringBuilder();
            while (tps.stream().anyMatch(tp -> c.position(tp) < end.get(tp))) {
                for (ConsumerRecord<byte[], byte[]> r : c.poll(Duration.ofMillis(500))) {
                    sb.setLength(0);
                    sb.append(r.partition()).append(' ').append(r.offset()).append(' ').append(r.timestamp()).append(' ')
                            .append(r.key() == null ? "-" : new String(r.key())).append(' ');
                    for (byte b : r.value()) sb.append(Character.forDigit((b >> 4) & 15, 16)).append(Character.forDigit(b & 15, 16));
                    System.out.println(sb);
                }
            }
        }
    }
}
